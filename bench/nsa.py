"""NSA's attention alone (one layer of the 125M model: D=768, 12 query heads in 3 GQA groups, head
dim 64, bf16, batch 1), forward+backward, beside cuDNN's dense causal attention on the same q/k/v,
and the share of each branch:

    PYTHONPATH=. python3 bench/nsa.py [--seqs 8192,16384,32768]

Rows: "nsa" is the whole method (compressed keys, compression attention with the selection, the
selection and window kernels, the gates) differentiated in q, k, v, x and its parameters; then
each part on its own: "compression+selection" (phi, RoPE, compressed attention and top-k),
"selection kernel" (the token-level kernel on those lists), "window kernel", "gates". TFLOP/s
count the (query, key) pairs each part computes (selected blocks, window, visible compressed
tokens), 4*H flops per pair and head forward, x3.5 forward+backward; dense counts the causal pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.attention import median_time
from models.rope import apply_rope
from sparsetrain.attention.method import AttentionInputs, StepContext
from sparsetrain.config import RopeConfig
from sparsetrain.ops.platform import on_gpu
from sparsetrain.sparse.nsa import NsaOptions

D, N, K, H = 768, 12, 3, 64


def layer_inputs(t: int, key, kv_heads: int = K):
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], (1, t, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, kv_heads, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, kv_heads, H), jnp.bfloat16)
    x = jax.random.normal(keys[3], (1, t, D), jnp.bfloat16)
    return q, k, v, x


def make_inputs(q_nope, k_nope, v, x) -> AttentionInputs:
    positions = jnp.arange(q_nope.shape[1], dtype=jnp.int32)[None]
    rope = functools.partial(apply_rope, cfg=RopeConfig())
    return AttentionInputs(q=rope(q_nope, positions), k=rope(k_nope, positions), v=v, q_nope=q_nope, k_nope=k_nope,
                           x=x, positions=positions, segment_ids=None, ctx=StepContext(train=True), rope=rope)


def pairs(o: NsaOptions, t: int) -> dict[str, float]:
    """(query, key) pairs per head of each part."""
    pos = np.arange(t)
    return {"selection kernel": float(np.minimum(o.topk * o.block_size, pos + 1).sum()),
            "window kernel": float(np.minimum(o.window, pos + 1).sum()),
            "compression+selection": float(np.maximum(0, (pos - o.kernel_size + 1) // o.kernel_stride + 1).sum()),
            "dense (cuDNN)": float((pos + 1).sum())}


def fwd_bwd(fn, *args):
    """A jitted forward+backward of fn(*args) against a fixed cotangent."""
    out = jax.eval_shape(fn, *args)
    cot = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), out)
    step = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cot))
    return lambda: median_time(step, *args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", default="8192,16384,32768")
    args = parser.parse_args(argv)
    o = NsaOptions()
    attn = o.build(num_heads=N, num_kv_heads=K, head_dim=H, model_dim=D, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(attn)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; NSA defaults {dataclasses.asdict(o)}")
    print("| T | part | fwd+bwd ms | share of nsa | TFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        q, k, v, x = layer_inputs(t, jax.random.key(t))

        def whole(params, q, k, v, x):
            return nnx.merge(graphdef, params)(make_inputs(q, k, v, x))

        def compression(params, q, k, v, x):
            return nnx.merge(graphdef, params).select(make_inputs(q, k, v, x)).extras["compressed"]

        sel = jax.jit(lambda params, q, k, v, x: nnx.merge(graphdef, params).select(make_inputs(q, k, v, x)))(
            params, q, k, v, x)
        sel = dataclasses.replace(sel, extras={})

        def selection(q, k, v):
            return attn.selection_branch(make_inputs(q, k, v, x), sel)

        def window(params, q, k, v, x):
            return nnx.merge(graphdef, params).window_branch(make_inputs(q, k, v, x))

        def gates(params, x):
            return nnx.merge(graphdef, params).gates(x)

        def dense(q, k, v):
            inp = make_inputs(q, k, v, x)
            return jax.nn.dot_product_attention(inp.q, inp.k, inp.v, is_causal=True,
                                                implementation="cudnn" if on_gpu() else None)

        times = {"nsa": fwd_bwd(whole, params, q, k, v, x)(),
                 "compression+selection": fwd_bwd(compression, params, q, k, v, x)(),
                 "selection kernel": fwd_bwd(selection, q, k, v)(),
                 "window kernel": fwd_bwd(window, params, q, k, v, x)(),
                 "gates": fwd_bwd(gates, params, x)(),
                 "dense (cuDNN)": fwd_bwd(dense, q, k, v)()}
        counted = pairs(o, t)
        counted["nsa"] = sum(counted[p] for p in ("selection kernel", "window kernel", "compression+selection"))
        for part, seconds in times.items():
            tflops = (f"{3.5 * 4 * H * N * counted[part] / seconds / 1e12:.0f}" if part in counted else "")
            print(f"| {t} | {part} | {seconds * 1e3:.2f} | {seconds / times['nsa']:.2f} | {tflops} |", flush=True)


if __name__ == "__main__":
    main()
