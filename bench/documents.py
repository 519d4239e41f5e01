"""Dense attention over packed documents, forward+backward on one GPU: what document masking costs.

    PYTHONPATH=. python3 bench/documents.py [--seqs 16384,65536] [--docs 1,4,16,64]

B=1, H=16 query and kv heads, D=128, bf16; the documents split T evenly. Per row:
  causal      cuDNN is_causal, documents not masked (data.cross_document_attention=true);
  masked      `dense_causal_attention` with segment ids, the GPU default (the block-sparse kernel
              over the tiles that hold a same-document pair, sparsetrain/attention/dense.py);
  cudnn_mask  cuDNN with the explicit [B, 1, T, T] mask, the alternative not taken (up to 16k:
              the mask alone is T^2 bytes).
Times are medians (bench/attention.py's `median_time`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.attention import ON_GPU, median_time
from sparsetrain.attention.dense import dense_causal_attention

H, D = 16, 128
MASK_MAX_SEQ = 16384


def fwd_bwd(impl: str):
    """jit of the q/k/v gradients of sum(attention), so one call runs forward and backward."""
    def loss(q, k, v, seg):
        return dense_causal_attention(q, k, v, segment_ids=seg, impl=impl).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="16384,65536" if ON_GPU else "256")
    parser.add_argument("--docs", default="1,4,16,64" if ON_GPU else "1,4")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32
    print("| T | documents | causal ms | masked ms | masked / causal | cudnn_mask ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        q, k, v = (jax.random.normal(jax.random.key(i), (1, t, H, D), dtype) for i in range(3))
        causal = median_time(fwd_bwd("auto"), q, k, v, None)
        for docs in map(int, args.docs.split(",")):
            seg = jnp.repeat(jnp.arange(1, docs + 1, dtype=jnp.int32), -(-t // docs))[None, :t]
            masked = median_time(fwd_bwd("auto"), q, k, v, seg)
            mask = (f"{1e3 * median_time(fwd_bwd('cudnn'), q, k, v, seg):.2f}"
                    if ON_GPU and t <= MASK_MAX_SEQ else "-")
            print(f"| {t} | {docs} | {1e3 * causal:.2f} | {1e3 * masked:.2f} | {masked / causal:.2f} | {mask} |")


if __name__ == "__main__":
    main()
