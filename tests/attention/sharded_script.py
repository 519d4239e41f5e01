"""Run with 8 fake CPU devices: block-sparse attention per shard vs unsharded, values and grads.

Prints one line per mesh: "MESH data,fsdp,tensor error", the largest max|difference| / max|reference|
over the loss and the three gradients.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from sparsetrain.attention.sharded import block_sparse_attention
from sparsetrain.ops import causal_block_mask, forced_block_mask

B, T, N, K, D, BS = 4, 96, 4, 2, 32, 32  # T not a block multiple: ragged last block


def main():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, D))
    k, v = (jax.random.normal(key, (B, T, K, D)) for key in keys[1:])
    tiles = forced_block_mask(causal_block_mask(T, T, BS), force_first=1, force_local=2)
    mask = jnp.broadcast_to(tiles, (B, K, *tiles.shape))

    def loss(q, k, v):
        out = block_sparse_attention(q, k, v, mask, block_size=BS, impl="pallas", interpret=True)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    reference = grad(q, k, v)
    for shape in [(2, 2, 2), (8, 1, 1), (1, 2, 4)]:
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        with jax.set_mesh(mesh):
            sharded = jax.jit(grad)(q, k, v)
        error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(sharded)))
        print("MESH", ",".join(map(str, shape)), error)


if __name__ == "__main__":
    main()
