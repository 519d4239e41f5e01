"""Run in a subprocess with 8 fake CPU devices: loss and gradients of context-parallel meshes against
one device, for local layers on the Triton kernel (interpreted) with the chunked loss.

    python context_parallel_script.py RUN_DIR   -> prints one JSON line: {case: {mesh: [loss err, grad err]}}
"""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.config import MeshConfig
from sparsetrain.train.sharding import batch_sharding, make_mesh, param_shardings
from sparsetrain.train.step import accumulate_gradients
from tests.train.helpers import small_config

SEQ = 128   # 2 x context=4 chunks of 16 tokens: one block of the smallest tile
LOCAL = ("model.attention.0.method=local", "model.attention.0.block_size=16",
         "model.attention.0.local_blocks=2", "model.attention.0.initial_blocks=1")
# Every method, dense and local included, is checked on these meshes by
# context_parallel_methods_script.py with the reference kernels; this script adds what that one does
# not run: the Triton kernel (interpreted) that GPUs run, on the rolled keys and masks, and the
# chunked loss (4 chunks of 128 tokens over the permuted batch), on packed documents.
CASES = {"local_pallas_documents": (*LOCAL, "model.attention.0.impl=pallas", "trainer.loss_chunk=128")}
MESHES = {"context4_data2": MeshConfig(data=2, context=4),
          "context2_data2_fsdp2": MeshConfig(data=2, fsdp=2, context=2)}


def batch(documents: bool) -> dict:
    tokens = jax.random.randint(jax.random.key(0), (4, SEQ + 1), 0, 256)
    mask = (jax.random.uniform(jax.random.key(1), (4, SEQ)) > 0.2).astype(jnp.float32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
           "positions": jnp.broadcast_to(jnp.arange(SEQ), (4, SEQ))}
    if documents:   # two documents per row, split at a different place in each row
        cut = jnp.array([[10], [40], [64], [100]])
        out["segment_ids"] = jnp.where(jnp.arange(SEQ) < cut, 1, 2)
        out["positions"] = jnp.where(jnp.arange(SEQ) < cut, jnp.arange(SEQ), jnp.arange(SEQ) - cut)
    return out


def rel_err(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(root: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for case, overrides in CASES.items():
        cfg = small_config(root, "model.dtype=float32", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}",
                           "trainer.z_loss=0.01", *overrides)
        model = ModelDef.create(cfg.model)
        params, data = model.init(0), batch(case.endswith("documents"))
        grads = jax.jit(functools.partial(accumulate_gradients, model=model, cfg=cfg.trainer, ctx=StepContext(),
                                          trainable=frozenset(flatten(params))))
        want_grads, want_loss, *_ = grads(params, data)
        out[case] = {}
        for name, mesh_cfg in MESHES.items():
            mesh = make_mesh(mesh_cfg)
            placed = jax.device_put(params, param_shardings(model.logical_axes(), model.abstract_params(), mesh))
            with jax.set_mesh(mesh):
                got_grads, got_loss, *_ = grads(placed, jax.device_put(data, batch_sharding(mesh)))
            out[case][name] = [rel_err(got_loss, want_loss), rel_err(got_grads, want_grads)]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main(Path(sys.argv[1]))
