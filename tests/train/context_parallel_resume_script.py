"""Run in a subprocess with 8 fake CPU devices: a run that changes its context split at every resume
(1 device -> mesh.context=2 -> mesh.context=4 over the ring -> 1 device) against the same run on one
device, with a sparse method (MoBA per token) on every layer.

    python context_parallel_resume_script.py RUN_DIR   -> one JSON line: {"straight": {step: loss},
        "split": {step: loss}, "params_err": relative max difference of the final parameters}
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from sparsetrain.checkpoint.model_def import flatten
from sparsetrain.train import Trainer
from tests.train.context_parallel_script import SEQ, rel_err
from tests.train.helpers import read_metrics, small_config

# No warm-up: its length depends on trainer.steps, which each leg of the split run sets.
RUN = (f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}", "model.dtype=float32", "optimizer.schedule=constant",
       "optimizer.warmup_steps=0", "trainer.eval_every=1000", "checkpoint.async_save=false",
       "model.attention.0.method=moba", "model.attention.0.block_size=16", "model.attention.0.moba_block=32",
       "model.attention.0.topk=2", "model.attention.0.granularity=token")
# (steps to train to, context devices, K/V exchange) of each leg of the split run.
LEGS = ((1, 1, "all_gather"), (2, 2, "all_gather"), (3, 4, "ring"), (4, 1, "all_gather"))


def train(root: Path, name: str, steps: int, context: int, exchange: str) -> Trainer:
    cfg = small_config(root, *RUN, f"name={name}", f"trainer.steps={steps}", f"mesh.context={context}",
                       f"mesh.kv_exchange={exchange}")
    trainer = Trainer(cfg, devices=jax.devices()[:context])
    trainer.run()
    return trainer


def main(root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    # The one-device legs compile the straight run's programs again: take them from a cache.
    jax.config.update("jax_compilation_cache_dir", str(root / "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    straight = train(root, "straight", LEGS[-1][0], 1, "all_gather")
    for steps, context, exchange in LEGS:
        split = train(root, "split", steps, context, exchange)
    losses = {name: {m["step"]: m["loss"] for m in read_metrics(root / name) if "loss" in m}
              for name in ("straight", "split")}
    params = [{k: np.asarray(v) for k, v in flatten(t.state["params"]).items()} for t in (split, straight)]
    print("RESULT " + json.dumps({**losses, "params_err": rel_err(*params)}))


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main(Path(sys.argv[1]))
