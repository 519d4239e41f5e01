"""SeerAttention on the 125M model: training-step cost of distillation and of sparse attention
against a dense step, and the recall the gates reach.

    PYTHONPATH=. python3 bench/seer.py steps [--seq 16384] [--json out.json]
    PYTHONPATH=. python3 bench/seer.py distill --dense_steps 300 --distill_steps 300 [--seq 16384]

`steps`: the same jitted train step the trainer runs (synthetic tokens, batch 1, bf16, all layers
Seer), median over repeated steps, for a dense model, Seer distillation (dense attention output,
only the gates differentiated, the block ground truth computed) and Seer sparse at 10% of each
row's causal blocks; also the block-score pass alone against a cuDNN forward of the same layer.
`distill`: trains the dense 125M model at `seq` on the embedded corpus, then distills Seer gates
from it with configs/seer_125m.py and prints the recall and KL of untrained and trained gates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import configs
from bench.steps import median_step_ms
from sparsetrain import ops
from sparsetrain.attention.dense import dense_causal_attention
from sparsetrain.attention.spec import DenseOptions
from sparsetrain.configbase import apply_overrides


def median_call_ms(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def with_attention(cfg, seq: int, rule):
    model = dataclasses.replace(cfg.model, max_seq_len=seq, attention=(rule,))
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, seq_len=seq, batch_size=1))


def steps(seq: int, base: str, seer: str) -> dict:
    base = configs.load(base)
    seer = configs.load(seer).model.attention[0]
    cases = {"dense": DenseOptions(), "seer_distill": seer,
             "seer_sparse_10pct": dataclasses.replace(seer, mode="sparse")}
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seq": seq, "steps": {}}
    for name, rule in cases.items():
        ms, metrics = median_step_ms(with_attention(base, seq, rule), seq)
        out["steps"][name] = {"ms": ms, "density": metrics.get("density")}
        print(f"{name:20s} {ms:8.2f} ms/step  density {metrics.get('density')}", flush=True)
    dense_ms = out["steps"]["dense"]["ms"]
    for name, row in out["steps"].items():
        row["ratio_to_dense"] = row["ms"] / dense_ms
    # The ground-truth pass alone, one layer's shapes: block scores vs a cuDNN forward.
    m = base.model
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, seq, m.num_heads, m.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, seq, m.num_kv_heads, m.head_dim), jnp.bfloat16) for key in keys[1:])
    scores_ms = median_call_ms(jax.jit(lambda q, k: ops.block_attention_scores(q, k, block_size=seer.block_size)),
                               q, k)
    dense_fwd_ms = median_call_ms(jax.jit(dense_causal_attention), q, k, v)
    out["layer"] = {"block_scores_ms": scores_ms, "cudnn_forward_ms": dense_fwd_ms,
                    "ratio": scores_ms / dense_fwd_ms}
    print(json.dumps(out, indent=1), flush=True)
    return out


def distill(seq: int, dense_steps: int, distill_steps: int, run_dir: str, base: str, seer: str) -> dict:
    from sparsetrain.train import Trainer
    common = [f"run_dir={run_dir}", "trainer.progress_bar=false", "tensorboard=false"]
    dense_cfg = apply_overrides(configs.load(base), common + [
        # Batch 2 with full remat: dense 125M training at 16k and batch 4 runs out of memory.
        "name=dense_16k", f"model.max_seq_len={seq}", f"data.seq_len={seq}", "data.batch_size=2",
        "model.remat=full",
        f"trainer.steps={dense_steps}", f"trainer.eval_every={dense_steps}", "checkpoint.every=0"])
    t0 = time.perf_counter()
    dense = Trainer(dense_cfg).run()
    dense_s = time.perf_counter() - t0
    seer_cfg = apply_overrides(configs.load(seer), common + [
        f"trainer.steps={distill_steps}", f"trainer.eval_every={distill_steps}", "checkpoint.every=0",
        f"checkpoint.init_from={Path(run_dir) / 'dense_16k'}"])
    trainer = Trainer(seer_cfg)
    before = trainer.evaluate()
    t0 = time.perf_counter()
    after = trainer.run()
    out = {"seq": seq, "dense": {"steps": dense_steps, "val_loss": dense.get("val/loss"), "seconds": dense_s},
           "untrained_gates": {k: before[k] for k in ("val/recall", "val/density", "val/kl")},
           "distilled": {k: after.get(k) for k in ("val/recall", "val/density", "val/kl", "kl", "seer_kl")},
           "distill_steps": distill_steps, "distill_seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("steps", "distill"))
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--dense_steps", type=int, default=300)
    parser.add_argument("--distill_steps", type=int, default=300)
    parser.add_argument("--run_dir", default="runs/bench_seer")
    parser.add_argument("--base", default="small_125m", help="dense config")
    parser.add_argument("--seer", default="seer_125m", help="Seer config")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = steps(args.seq, args.base, args.seer) if args.what == "steps" else distill(args.seq, args.dense_steps,
                                                                  args.distill_steps, args.run_dir, args.base, args.seer)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
