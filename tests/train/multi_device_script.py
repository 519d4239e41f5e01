"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts).

    python multi_device_script.py RUN_DIR   -> prints one JSON line of results
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from sparsetrain.train import Trainer
from sparsetrain.checkpoint.model_def import flatten
from tests.train.helpers import small_config

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2), "1dev": (1, 1, 1),
          "2x2x2_local": (2, 2, 2), "1dev_local": (1, 1, 1)}
# Block-sparse layers (run per shard with shard_map) on the kernel in interpret mode.
LOCAL = ("model.attention.0.method=local", "model.attention.0.impl=pallas", "model.attention.0.block_size=16",
         "model.attention.0.local_blocks=2")


def spec_of(array) -> list:
    """The PartitionSpec as JSON: one entry per dimension (None = replicated)."""
    spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    return [a if a is None or isinstance(a, str) else list(a) for a in spec]


def mesh_overrides(shape):
    return [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]


def main(root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    out = {"losses": {}, "specs": {}, "restored_equal": {}}
    for name, shape in MESHES.items():
        cfg = small_config(root, "trainer.steps=3", "trainer.eval_every=100", f"name={name}",
                           "model.dtype=float32", *mesh_overrides(shape),
                           *(LOCAL if name.endswith("_local") else ()))
        trainer = Trainer(cfg, devices=jax.devices()[:int(np.prod(shape))])
        trainer.run()
        out["losses"][name] = [json.loads(line)["loss"] for line in
                               (root / name / "metrics.jsonl").read_text().splitlines()
                               if "loss" in json.loads(line)]
        out["specs"][name] = {k: spec_of(v) for k, v in flatten(trainer.state["params"]).items()}
        if name == "2x2x2":
            mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.state["opt_state"])[0]
                  if "mu" in str(path) and "'q_proj'" in str(path) and "DictKey(key=0)" in str(path)]
            out["opt_specs_2x2x2"] = {"layers/0/attn/q_proj": spec_of(mu[0])}
    # Restore the (2,2,2) run's final checkpoint onto other meshes: same values, new placement.
    saved = {k: np.asarray(v) for k, v in flatten(Trainer(small_config(
        root, "trainer.steps=3", "name=2x2x2", "model.dtype=float32",
        *mesh_overrides(MESHES["2x2x2"]))).state["params"]).items()}
    for target in ("8x1x1", "1dev"):
        cfg = small_config(root, "trainer.steps=3", "name=2x2x2", "model.dtype=float32",
                           *mesh_overrides(MESHES[target]))
        trainer = Trainer(cfg, devices=jax.devices()[:int(np.prod(MESHES[target]))])
        params = flatten(trainer.state["params"])
        out["restored_equal"][target] = all(np.array_equal(np.asarray(params[k]), saved[k]) for k in saved)
        out["specs"][f"restored_on_{target}"] = {k: spec_of(v) for k, v in params.items()}
        out["restored_step"] = int(trainer.state["step"])
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
