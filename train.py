"""Train a sparsetrain model.

    python train.py                                   # configs/tiny.py on the embedded corpus
    python train.py --config configs/small_125m.py model.remat=full trainer.steps=1000
    python train.py --init_from runs/other            # start from another run's weights
    python train.py --config runs/x/config.json       # reproduce a run from its own directory
    python train.py --help                            # configs and every overridable field

Runs resume automatically from the newest intact checkpoint in run_dir/name; a resume with a
changed config is refused unless --allow_config_change. Options and overrides go in any order, each
key once. Exit codes: 0 finished, 2 an input error (one `error:` line: config, data, checkpoint, or
a step that does not fit in memory), 130 stopped by SIGINT (Ctrl-C), 143 by SIGTERM, each after
saving a checkpoint; a second signal exits at once without saving. The loop itself lives in
sparsetrain.train so it can be imported, tested and reused; this file only parses the command line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import configs
from sparsetrain.attention.spec import METHODS
from sparsetrain.config_help import describe
from sparsetrain.configbase import apply_overrides, reject_repeated_keys
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
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume even though the config differs from the saved one (kept as config.<step>.json)")
    parser.add_argument("-h", "--help", action="store_true", help="list configs and fields, then exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of config fields")
    return parser.parse_intermixed_args(argv)   # options before, between or after overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = configs.load(args.config)
        overrides = list(args.overrides)
        if args.init_from:
            overrides.append(f"checkpoint.init_from={args.init_from}")
        reject_repeated_keys(overrides)
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
    from sparsetrain.train.interrupt import EXIT_CODES
    try:
        summary = train(cfg, allow_config_change=args.allow_config_change)
    except InputError as e:   # data, tokenizer, checkpoint, config change, memory: one line each
        return _fail(e)
    except KeyboardInterrupt:   # Ctrl-C before training started: nothing to save
        print("error: interrupted before training started", file=sys.stderr)
        return EXIT_CODES[signal.SIGINT]
    print(json.dumps(summary, default=str))
    return EXIT_CODES.get(summary["signal"], 0)


def _fail(error: InputError) -> int:
    print(f"error: {error}".replace("\n", "\nerror: "), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
