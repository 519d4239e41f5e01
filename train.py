"""Train a sparsetrain model.

    python train.py                                   # configs/tiny.py on the embedded corpus
    python train.py --config configs/small_125m.py model.remat=full trainer.steps=1000
    python train.py --init_from runs/other            # start from another run's weights
    python train.py --config runs/x/config.json       # reproduce a run from its own directory
    python train.py --help                            # configs and every overridable field

Runs resume automatically from the latest checkpoint in run_dir/name. The loop itself lives in
sparsetrain.train so it can be imported, tested and reused; this file only parses the command line.
"""

from __future__ import annotations

import argparse
import json
import sys

import configs
from sparsetrain.attention.spec import METHODS
from sparsetrain.config_help import describe
from sparsetrain.configbase import apply_overrides
from sparsetrain.errors import InputError
from sparsetrain.xla_flags import use_gpu_xla_flags


ATTENTION_HELP = """attention: model.attention is a tuple of per-layer rules (last match wins); each rule is
one method's options. Methods: {methods}.
  model.attention.N.method=NAME    switches rule N to that method with its defaults (keeps `layers`)
  model.attention.N.FIELD=VALUE    sets one of that method's fields; others are rejected by name
  model.attention='[{{layers: all, method: dense}}, {{layers: "1:-1", method: seer, topk: 4}}]'
                                   replaces the whole rule list (inline YAML or JSON): add or remove rules
  --help model.attention.0.method=seer   lists the seer rule's fields (and so for any method)
Overrides apply together (their order does not matter) and are validated once.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("--config", default="tiny",
                        help="config name (configs/NAME.py), path of a Python config file, or a run's config.json")
    parser.add_argument("--init_from", default=None, help="run or checkpoint to take weights from")
    parser.add_argument("-h", "--help", action="store_true", help="list configs and fields, then exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of config fields")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = configs.load(args.config)
        overrides = list(args.overrides)
        if args.init_from:
            overrides.append(f"checkpoint.init_from={args.init_from}")
        cfg = apply_overrides(cfg, overrides)
    except InputError as e:
        return _fail(e)
    if args.help:
        print(__doc__)
        print(f"configs: {', '.join(configs.available())}\n\n{ATTENTION_HELP.format(methods=', '.join(METHODS))}")
        print(f"fields of {args.config} (set with key=value):")
        print("\n".join(describe(cfg)))
        return 0
    use_gpu_xla_flags()
    from sparsetrain.train import train  # imports JAX: keep --help and config errors fast
    try:
        summary = train(cfg)
    except InputError as e:   # a data, tokenizer or checkpoint path: found before the model is built
        return _fail(e)
    print(json.dumps(summary, default=str))
    return 0


def _fail(error: InputError) -> int:
    print(f"error: {error}".replace("\n", "\nerror: "), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
