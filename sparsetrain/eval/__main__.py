"""python -m sparsetrain.eval RUN_OR_CHECKPOINT [options]

Evaluates a run directory (its latest checkpoint), a checkpoint folder, or a Hugging Face Llama
folder, and writes results.json, results.md and PNG plots to --out (default RUN_OR_CHECKPOINT/eval).
Sparse models run twice: as configured ("sparse") and with every layer dense ("dense"); --modes
picks one. Lengths are powers of two from --min_len up to --max_len (default: a quarter of the
length the weights were trained at, data.seq_len, up to four times it; lengths past it measure how
RoPE and the attention extrapolate). Retrieval probes (passkey, NIAH, MQAR, variable tracking,
copy) are scored by exact match, per-token accuracy and answer loss (docs/eval.md). `model.FIELD=VALUE` arguments
evaluate the weights under another model config, e.g. a RoPE scaling they were not trained with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsetrain.errors import InputError
from sparsetrain.eval import report
from sparsetrain.eval.measure import load_subject
from sparsetrain.eval.suite import TASKS, EvalOptions, default_lengths, evaluate


def _numbers(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__}s") from None
    return parse


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m sparsetrain.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, checkpoint folder, or Hugging Face Llama folder")
    parser.add_argument("overrides", nargs="*", metavar="model.FIELD=VALUE",
                        help="evaluate the weights under another model config, e.g. model.rope.scaling=yarn "
                             "model.rope.factor=8 model.rope.original_max_len=2048")
    parser.add_argument("--out", help="output directory (default: CHECKPOINT/eval)")
    parser.add_argument("--min_len", type=int, help="shortest length (default data.seq_len / 4)")
    parser.add_argument("--max_len", type=int, help="longest context length (default 4 x data.seq_len)")
    parser.add_argument("--modes", type=_numbers(str), default=("sparse", "dense"),
                        help="sparse (as configured) and/or dense (every layer dense); default both")
    parser.add_argument("--tasks", type=_numbers(str), default=TASKS,
                        help=f"{', '.join(TASKS)} (default all)")
    parser.add_argument("--loss_tokens", type=int, default=32768, help="held-out tokens per length")
    parser.add_argument("--depths", type=_numbers(float), default=(0.0, 0.25, 0.5, 0.75, 1.0),
                        help="needle depths in [0, 1] (passkey and NIAH)")
    parser.add_argument("--samples", type=int, default=4, help="probes per task x length x depth")
    parser.add_argument("--mqar_pairs", type=_numbers(int), default=(),
                        help="pairs per MQAR probe (default: length // 32 at each length)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic probes")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the run's)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        subject = load_subject(args.checkpoint, dtype=args.dtype, overrides=args.overrides)
        lengths = default_lengths(args.min_len, args.max_len, subject.cfg.data.seq_len)
        options = EvalOptions(lengths=lengths, modes=args.modes, tasks=args.tasks, loss_tokens=args.loss_tokens,
                              depths=args.depths, samples=args.samples, mqar_pairs=args.mqar_pairs,
                              seed=args.seed)
        out = Path(args.out or Path(args.checkpoint) / "eval")
        out.mkdir(parents=True, exist_ok=True)
        results = evaluate(subject, options, progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = report.write(results, out)
    print(report.summary(results))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
