"""`python -m finetune.converter [--context module:function] CONVERTER_ARGS...`

mlx-audio's converter (`mlx_audio.convert.main`, unchanged), run inside a family's context
manager: `function(source_path)` can stand local files in for what mlx-audio would fetch from
the hub while it builds the model (CSM's Mimi and text tokenizer). `finetune.variants.
run_converter` starts this as a subprocess; nothing else should.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--context")
    parser.add_argument("--hf-path", required=True)
    ours, rest = parser.parse_known_args(argv)
    context: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if ours.context:
        module, _, name = ours.context.partition(":")
        context = getattr(importlib.import_module(module), name)(Path(ours.hf_path))

    from mlx_audio import convert

    sys.argv = ["mlx_audio.convert", "--hf-path", ours.hf_path, *rest]
    with context:
        convert.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
