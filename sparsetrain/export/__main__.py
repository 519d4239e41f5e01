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
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                        help="weight dtype (default bfloat16: half the size, logits within ~3e-2 of the "
                             "JAX model's scale; float32 matches the JAX float32 model within 1e-4)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte', a tokenizer.json, or 'none' (default: the run's data.tokenizer)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exactness = ("matches the JAX float32 model's logits within 1e-4 of their scale" if args.dtype == "float32"
                 else "rounded from float32: logits differ from JAX by ~3e-2 of their scale (2.7e-2 "
                      "measured, docs/export.md); --dtype float32 for exact parity")
    print(f"exported {args.checkpoint} to {out} with {args.dtype} weights ({exactness})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
