"""Run with 8 fake CPU devices: the loss and gradients of the conformance cases in SHARDED_CASES on
a (2, 2, 2) mesh against one device. Prints "RESULT {case: {"loss": err, "grads": err}}" with errors
relative to the largest reference magnitude.

    python sharded_script.py PART PARTS   -> the cases SHARDED_CASES[PART::PARTS]

SHARDED_CASES is every method's default plus the variants whose sharded program differs: tile
instead of token selections (infllm_v2-tile, moba-tile), SSA's extra dense pass (local-ssa),
Seer's gate-selected sparse mode (seer-sparse) and DSA's gathers of selected keys (dsa-sparse). The other variants change routing parameters or
the compressor inside the same sharded program; the single-device conformance tests cover them."""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from sparsetrain.attention.method import StepContext
from sparsetrain.checkpoint.model_def import ModelDef
from sparsetrain.partitioning import MESH_AXES
from sparsetrain.train.sharding import batch_sharding, param_shardings
from tests.sparse.helpers import tokens
from tests.sparse.test_conformance import SHARDED_CASES, model_config, rule, with_method_params


def relative_error(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(x)), 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(part: int, parts: int):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 1, 2), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))  # no context split
    results = {}
    for method, variant in SHARDED_CASES[part::parts]:
        cfg = model_config(rule(method, variant))   # a dense layer and one of the method
        model = ModelDef.create(cfg)
        params = with_method_params(cfg)
        toks = jnp.asarray(tokens(96, batch=4, seed=6))

        def loss(p, t):
            logits, losses, _ = model.apply(p, t, ctx=StepContext(train=True, rng=jax.random.key(0)))
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + sum(losses.values(), 0.0)

        grad = jax.value_and_grad(loss)
        with jax.default_matmul_precision("highest"):
            reference = jax.jit(grad)(params, toks)
            shardings = param_shardings(model.logical_axes(), model.abstract_params(), mesh)
            with jax.set_mesh(mesh):
                placed = jax.device_put(params, shardings)
                sharded = jax.jit(grad)(placed, jax.device_put(toks, batch_sharding(mesh)))
        results[f"{method}-{variant}"] = {"loss": relative_error(reference[0], sharded[0]),
                                          "grads": relative_error(reference[1], sharded[1])}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
