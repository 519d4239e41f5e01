"""DSA's attention alone (one layer of the 125M model: D=768, 12 query heads over 4 KV heads, head
dim 64, bf16, batch 1) beside cuDNN's dense causal attention on the same q/k/v, and the share of
each part, to check that the O(T^2) indexer does not dominate:

    PYTHONPATH=. python3 bench/dsa.py [--seqs 16384,32768] [--topk 2048] [--index_heads 4]

Rows (forward+backward unless said): "dsa sparse layer" is the whole layer in sparse mode (indexer,
top-k, attention over the selected keys, the KL over them) differentiated in q, k, v, x and its
parameters; then its parts: "indexer top-k (fwd)" (projections and chunked top-k; no gradient),
"selected-key attention" (XLA gathers, the layer's default, and the Triton kernel), "indexer KL over
the selection"; and "indexer KL dense (warm-up)", the
warm-up's loss, and "hisa top-k (fwd)" with the default 64 candidate blocks of 64.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bench.attention import median_time
from bench.nsa import D, H, N, fwd_bwd, layer_inputs, make_inputs
from sparsetrain.attention.method import AuxLoss
from sparsetrain.ops.platform import on_gpu
from sparsetrain.ops.selected_keys import selected_key_attention
from sparsetrain.sparse import dsa_indexer
from sparsetrain.sparse.dsa import DsaOptions

K = 4   # the 125M model's KV heads (configs/dsa_125m.py)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", default="16384,32768")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--index_heads", type=int, default=4)
    args = parser.parse_args(argv)
    o = DsaOptions(mode="sparse", topk=args.topk, dense_len=min(args.topk, 2048), index_heads=args.index_heads)
    graphdef, params = nnx.split(o.build(num_heads=N, num_kv_heads=K, head_dim=H, model_dim=D, rngs=nnx.Rngs(0)))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; DSA {dataclasses.asdict(o)}\n"
          f"| T | part | ms | share of the dsa layer |\n| --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        q, k, v, x = layer_inputs(t, jax.random.key(t), kv_heads=K)
        doc_start = jnp.zeros((1, t), jnp.int32)

        def whole(params, q, k, v, x):
            out, captured = nnx.capture(nnx.merge(graphdef, params), AuxLoss)(make_inputs(q, k, v, x))
            return out, sum(jax.tree.leaves(captured))

        def index(params, x):
            return nnx.merge(graphdef, params).indexer(make_inputs(q, k, v, x))

        def top_k(params, x, candidates="tokens"):
            return dsa_indexer.select(index(params, x), doc_start, topk=o.topk, query_chunk=o.query_chunk,
                                      candidates=candidates, block_size=o.block_size,
                                      candidate_blocks=o.candidate_blocks)

        keys = jax.jit(top_k)(params, x)
        inp = make_inputs(q, k, v, x)

        def kl(params, q, k, selected=None):
            rope = make_inputs(q, k, v, x)
            return dsa_indexer.kl_rows(index(params, x), rope.q, rope.k, doc_start, query_chunk=o.query_chunk,
                                       selected=selected).mean()

        def dense(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if on_gpu() else None)

        times = {"dsa sparse layer": fwd_bwd(whole, params, q, k, v, x)(),
                 "indexer top-k (fwd)": median_time(jax.jit(top_k), params, x),
                 **{f"selected-key attention ({impl})": fwd_bwd(lambda q, k, v, impl=impl: selected_key_attention(
                     q, k, v, keys, query_chunk=o.query_chunk, impl=impl), inp.q, inp.k, inp.v)()
                    for impl in ("xla", "pallas")},
                 "indexer KL over the selection": fwd_bwd(lambda p: kl(p, q, k, keys), params)(),
                 "indexer KL dense (warm-up)": fwd_bwd(lambda p: kl(p, q, k), params)(),
                 "hisa top-k (fwd)": median_time(jax.jit(lambda p, x: top_k(p, x, "blocks")), params, x),
                 "dense (cuDNN)": fwd_bwd(dense, inp.q, inp.k, inp.v)()}
        for part, seconds in times.items():
            print(f"| {t} | {part} | {seconds * 1e3:.2f} | {seconds / times['dsa sparse layer']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
