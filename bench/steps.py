"""Training-step time of the 125M model with attention rules given on the command line, against a
dense step in the same run (median over repeated steps of the trainer's own jitted step, synthetic
tokens, batch 1).

    PYTHONPATH=. python3 bench/steps.py --seq 32768 --remat full --case moba=configs/moba_125m.py \
        --case "infllm48=configs/infllm_v2_125m.py model.attention.0.topk=48"

Each `--case "NAME=CONFIG [OVERRIDE ...]"` takes the attention rules of a config (its
`model.attention`, after the command-line style overrides) on the model of `--base` (default
small_125m; NSA's cases need `--base configs/nsa_125m.py`, whose GQA groups the token kernel
tiles); the dense case always runs first. `--case "NAME@ORDER=..."` (ORDER `query` or `key`) traces
that case's token-level kernels in that loop order (`Tuning.token_order`; default `auto`). Prints one line per case and a JSON summary (ms, ratio to dense, measured
density, model TFLOP/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import configs
from pallas_kernels.block_sparse import kernel
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.configbase import apply_overrides
from sparsetrain.train.metrics import flops_per_token
from sparsetrain.train.optimizer import frozen_paths, learning_rate_schedule, make_optimizer
from sparsetrain.train.step import make_train_step


def train_step_and_state(cfg, batch: int, seq: int):
    """(jitted train step of `cfg` donating its state, initial state, synthetic batch [batch, seq]).
    One document per row and no segment ids, as with data.cross_document_attention=true: dense
    layers then run cuDNN's causal kernel, the baseline sparse methods are measured against."""
    model = ModelDef.create(cfg.model)
    params = jax.jit(model.init, static_argnums=0)(0)
    frozen = frozen_paths(cfg.optimizer, cfg.model, params)
    optimizer = make_optimizer(cfg.optimizer, params, 1000, frozen)
    step = jax.jit(make_train_step(model, optimizer, cfg.trainer, learning_rate_schedule(cfg.optimizer, 1000),
                                   frozenset(flatten(params)) - frozen), donate_argnums=0)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 256)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((batch, seq)),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    return step, state, data


def median_step_ms(cfg, seq: int, reps: int = 10) -> tuple[float, dict]:
    """Median ms of the train step of `cfg` on one synthetic batch [1, seq], and its last metrics."""
    step, state, batch = train_step_and_state(cfg, 1, seq)
    for _ in range(3):   # compile and warm up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), {k: float(v) for k, v in metrics.items() if "/" not in k}



def with_rules(cfg, seq: int, rules, remat: str):
    model = dataclasses.replace(cfg.model, max_seq_len=seq, attention=tuple(rules), remat=remat)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, seq_len=seq, batch_size=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--case", action="append", default=[],
                        help="'NAME=CONFIG [OVERRIDE ...]' (the config's attention rules)")
    parser.add_argument("--base", default="small_125m",
                        help="config whose model (all but its attention rules) every case runs, dense included")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base = configs.load(args.base)
    cases = {"dense": ((DenseOptions(),), "auto")}
    for name, spec in (item.split("=", 1) for item in args.case):
        path, *overrides = spec.split()
        order = name.split("@")[1] if "@" in name else "auto"
        cases[name] = (apply_overrides(configs.load(path), overrides).model.attention, order)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq": args.seq,
           "remat": args.remat, "cases": {}}
    for name, (rules, order) in cases.items():
        cfg = with_rules(base, args.seq, rules, args.remat)
        # Read while the step is traced; "auto" keeps the default tuning of every kernel.
        with kernel.tuning(kernel.Tuning(token_order=order)) if order != "auto" else contextlib.nullcontext():
            ms, metrics = median_step_ms(cfg, args.seq)
        tflops = flops_per_token(cfg.model, args.seq) * args.seq / (ms * 1e-3) / 1e12
        out["cases"][name] = {"ms": ms, "ratio_to_dense": ms / out["cases"].get("dense", {"ms": ms})["ms"],
                              "density": metrics.get("density"), "skipped": metrics.get("skipped"),
                              "model_tflops": tflops}
        print(f"{name:12s} {ms:8.2f} ms/step  x{out['cases'][name]['ratio_to_dense']:.3f} of dense  "
              f"density {metrics.get('density')}  skipped (BLASST) {metrics.get('skipped')}  "
              f"{tflops:.0f} model TFLOP/s", flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
