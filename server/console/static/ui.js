// Small DOM helpers shared by the pages, and the page-wide problem banner.
import { describe } from "./api.js";

/** el("button", {class: "primary", onclick}, "Play") */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A labelled form field: its wrapper, with the control inside. */
export function field(label, control, hint) {
  if (!control.id) control.id = `f-${Math.random().toString(36).slice(2, 9)}`;
  return el(
    "div",
    { class: "field" },
    el("label", { for: control.id }, label),
    control,
    hint ? el("span", { class: "hint" }, hint) : null,
  );
}

export function showProblem(err) {
  const box = document.getElementById("problem");
  box.replaceChildren(
    el("span", { id: "problem-text" }, describe(err)),
    el("button", { type: "button", onclick: clearProblem }, "Dismiss"),
  );
  box.hidden = false;
}

export function clearProblem() {
  const box = document.getElementById("problem");
  box.hidden = true;
  box.replaceChildren();
}

/** Runs an async action, showing its failure in the banner; returns its value or undefined. */
export async function guarded(action) {
  try {
    clearProblem();
    return await action();
  } catch (err) {
    if (err?.name === "AbortError") return undefined;
    showProblem(err);
    return undefined;
  }
}

export function seconds(value, digits = 2) {
  return value === null || value === undefined || Number.isNaN(value)
    ? "–"
    : `${value.toFixed(digits)} s`;
}
