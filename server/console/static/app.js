// The console's shell: the hash router, the key form, and the page-wide error handlers.
// A page is a module in pages/ exporting `render(view, params)`, which may return a function
// that stops what the page started (audio, sockets, event streams) when the person leaves.
import { getKey, setKey } from "./api.js";
import { clearProblem, showProblem } from "./ui.js";

// "job" (#/job/ID, one fine-tune job followed live) is reached from the Jobs and Fine-tune pages.
const PAGES = ["voices", "playground", "clone", "finetune", "jobs", "job", "conversation"];
const NAV_OF = { job: "jobs" };
const DEFAULT_PAGE = "voices";
let leave = null;

function route() {
  const [path, query = ""] = window.location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  return {
    page: PAGES.includes(page) ? page : DEFAULT_PAGE,
    id: rest.join("/") || null,
    params: new URLSearchParams(query),
  };
}

async function show() {
  const { page, id, params } = route();
  if (leave) {
    try {
      leave();
    } catch (err) {
      showProblem(err);
    }
    leave = null;
  }
  clearProblem();
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === (NAV_OF[page] || page)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const view = document.getElementById("view");
  delete view.dataset.ready;
  view.replaceChildren();
  view.dataset.page = page;
  document.title = `${page[0].toUpperCase()}${page.slice(1)} · voicefoundry`;
  try {
    const module = await import(`./pages/${page}.js`);
    leave = (await module.render(view, { id, params })) || null;
  } catch (err) {
    showProblem(err);
  }
  view.dataset.ready = "1";
}

function keyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const describeKey = () => {
    state.textContent = getKey() ? "key saved" : "no key";
  };
  input.value = getKey();
  describeKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(input.value);
    describeKey();
    show();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    setKey("");
    input.value = "";
    describeKey();
    show();
  });
}

window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  showProblem(event.reason);
});
window.addEventListener("error", (event) => {
  event.preventDefault();
  showProblem(event.error || event.message);
});
window.addEventListener("hashchange", show);
keyForm();
show();
