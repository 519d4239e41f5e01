"""python -m sparsetrain.export CHECKPOINT_DIR OUT_DIR [--dtype bfloat16|float32] [--tokenizer SPEC]"""

from __future__ import annotations

import argparse
import sys

from sparsetrain.export.export import export_checkpoint
from sparsetrain.export.safetensors_io import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsetrain.export",
        description="Write a Hugging Face Llama folder (safetensors, config, tokenizer) from a checkpoint.")
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or one step's folder")
    parser.add_argument("out_dir", help="new (or empty) output directory")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte', a tokenizer.json, or 'none' (default: the run's data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
