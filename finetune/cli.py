"""Command-line entry of the finetune subsystem (`python -m finetune ...`).

Each command registers itself on an argparse sub-parser, so the user-facing `voicefoundry`
script (server/cli.py) offers the same commands with the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    tiny = subparsers.add_parser(
        "make-tiny", help="write a random-initialised checkpoint in the real on-disk layout"
    )
    from finetune.families import FAMILIES

    def per_family(what: str) -> str:
        return "; ".join(f"{f.name}: {' | '.join(getattr(f, what))}" for f in FAMILIES.values())

    tiny.add_argument("family", choices=tuple(FAMILIES))
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--variant", default="base", help=per_family("variants"))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--preset", default="tiny", help=per_family("presets"))
    tiny.add_argument(
        "--layout",
        help="the distribution's on-disk layout (default: the first named); "
        + "; ".join(f"{f.name}: {' | '.join(f.layouts)}" for f in FAMILIES.values() if f.layouts),
    )
    quantized = per_family("quantized")
    tiny.add_argument(
        "--quantize", metavar="VARIANT", help=f"write this quantised variant of it: {quantized}"
    )
    tiny.set_defaults(handler=_make_tiny)

    quantize = subparsers.add_parser(
        "quantize", help="write a quantised variant of a local checkpoint (as mlx-community does)"
    )
    quantize.add_argument("family", choices=tuple(FAMILIES))
    quantize.add_argument("src", type=Path)
    quantize.add_argument("out_dir", type=Path)
    quantize.add_argument("--variant", required=True, help=quantized)
    quantize.set_defaults(handler=_quantize)

    doctor = subparsers.add_parser(
        "doctor",
        help="platform, MLX device, BLAS, fast paths; with MODEL: what a model directory holds "
        "and whether it loads",
    )
    doctor.add_argument(
        "model",
        nargs="?",
        help="a model directory (or a hub id in the local cache): its family, layout, variant, "
        "quantisation and dtype, then a load with the family's loader (exit 1 if it fails)",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.add_argument("--no-measure", action="store_true", help="skip the matmul timing")
    doctor.add_argument("--no-load", action="store_true", help="with MODEL: describe only")
    # resolve_model(args) -> (path or hub id, the family the settings name or None): the
    # `voicefoundry` script sets it to look MODEL up among configured models too.
    doctor.set_defaults(handler=_doctor, resolve_model=None)

    from finetune import commands

    commands.register(subparsers)


def _make_tiny(args: argparse.Namespace) -> int:
    from finetune.families import get_family

    family = get_family(args.family)
    if args.preset not in family.presets:
        print(f"error: --preset must be one of {', '.join(family.presets)}", file=sys.stderr)
        return 2
    if args.variant not in family.variants:
        print(f"error: --variant must be one of {', '.join(family.variants)}", file=sys.stderr)
        return 2
    options = {"seed": args.seed, "preset": args.preset, "variant": args.variant}
    if family.layouts:
        layout = args.layout or family.layouts[0]
        if layout not in family.layouts:
            print(f"error: --layout must be one of {', '.join(family.layouts)}", file=sys.stderr)
            return 2
        options["layout"] = layout
    elif args.layout is not None:
        print(f"error: {family.name} has one layout; --layout does not apply", file=sys.stderr)
        return 2
    if args.quantize is not None and args.quantize not in family.quantized:
        return _no_variant(family.name, family.quantized)
    entry = family.entry_module()
    if args.quantize is None:
        try:
            print(entry.make_tiny(args.out_dir, **options))
        except ValueError as exc:  # an option the family refuses (e.g. a variant's sizes)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    import tempfile

    args.out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".full.", dir=args.out_dir.parent) as full:
        source = entry.make_tiny(Path(full) / "model", **options)
        print(entry.quantize(source, args.out_dir, args.quantize))
    return 0


def _no_variant(family: str, known: tuple[str, ...]) -> int:
    listed = ", ".join(known) or "none"
    print(f"error: {family} quantised variants are {listed}", file=sys.stderr)
    return 2


def _quantize(args: argparse.Namespace) -> int:
    from finetune.families import get_family
    from finetune.loading import CheckpointError

    family = get_family(args.family)
    if args.variant not in family.quantized:
        return _no_variant(family.name, family.quantized)
    try:
        print(family.entry_module().quantize(args.src, args.out_dir, args.variant))
    except CheckpointError as exc:
        print(f"error: {'; '.join(exc.problems)} ({exc.path})", file=sys.stderr)
        return 1
    return 0


def _doctor(args: argparse.Namespace) -> int:
    if args.model is not None:
        return _doctor_model(args)
    from finetune.runtime.doctor import format_report, report

    info = report(measure=not args.no_measure)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _doctor_model(args: argparse.Namespace) -> int:
    from finetune import model_doctor

    target, family = args.model, None
    if args.resolve_model is not None:
        try:
            target, family = args.resolve_model(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    found = model_doctor.examine(target, expected_family=family, load=not args.no_load)
    if target != args.model:
        found.model = args.model
    print(json.dumps(found.to_dict(), indent=2) if args.json else model_doctor.format_report(found))
    return model_doctor.exit_code(found, load=not args.no_load)


def build_parser(prog: str = "python -m finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
