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
    tiny.set_defaults(handler=_make_tiny)

    doctor = subparsers.add_parser("doctor", help="platform, MLX device, BLAS, fast paths")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.add_argument("--no-measure", action="store_true", help="skip the matmul timing")
    doctor.set_defaults(handler=_doctor)

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
    entry = family.entry_module()
    print(entry.make_tiny(args.out_dir, **options))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from finetune.runtime.doctor import format_report, report

    info = report(measure=not args.no_measure)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


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
