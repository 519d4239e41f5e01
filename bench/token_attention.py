"""Token-level vs tile-level block-sparse attention at the same number of selected blocks.

    PYTHONPATH=. python3 bench/token_attention.py [--seqs 16384,65536] [--groups 16,4]
        [--token-rows 16,64]

NSA defaults: every query token (token level) or query tile (tile level) selects 16 key blocks of
64 (random causal blocks, the diagonal always in). B=1, N=16 query heads, K = N / G, D=128, bf16,
causal. Token lists are either "random" (drawn per token: a P-token tile loops over the union of
P unrelated lists) or "shared" (each token takes its 64-token tile's list, as adjacent tokens of a
trained selection mostly do). token_rows is `Tuning.token_rows` (P = token_rows // G tokens a
tile). TFLOP/s count the selected (row, key) pairs, 4*D flops each forward, x3.5 fwd+bwd.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.attention import median_time
from pallas_kernels.block_sparse import kernel
from sparsetrain import ops

N, D, BS, TOPK = 16, 128, 64, 16


def random_lists(key, heads: int, rows: int, n_k: int, rows_per_block: int):
    """int32 [1, heads, rows, TOPK] sorted causal picks (diagonal forced), counts [1, heads, rows]."""
    diag = jnp.arange(rows) // rows_per_block
    score = jax.random.uniform(key, (1, heads, rows, n_k))
    cols = jnp.arange(n_k)
    score = jnp.where(cols == diag[:, None], 2.0, jnp.where(cols <= diag[:, None], score, -1.0))
    vals, idx = jax.lax.top_k(score, min(TOPK, n_k))
    idx = jnp.sort(jnp.where(vals >= 0, idx, n_k), axis=-1)
    counts = (idx < n_k).sum(-1, dtype=jnp.int32)
    return jnp.where(idx < n_k, idx, -1).astype(jnp.int32), counts


def timed(sel, q, k, v, do):
    fwd = jax.jit(lambda q, k, v, s: ops.block_sparse_attention(q, k, v, s, block_size=BS))
    fwd_bwd = jax.jit(lambda q, k, v, s, do: jax.vjp(
        lambda q, k, v: ops.block_sparse_attention(q, k, v, s, block_size=BS), q, k, v)[1](do))
    return median_time(fwd, q, k, v, sel), median_time(fwd_bwd, q, k, v, sel, do)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", default="16384,65536")
    parser.add_argument("--groups", default="16,4")
    parser.add_argument("--token-rows", default="16,64")
    args = parser.parse_args(argv)
    key = jax.random.PRNGKey(0)
    print("| T | G | level | lists | token_rows | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        n_k = t // BS
        flops = 4.0 * N * t * TOPK * BS * D
        for g in map(int, args.groups.split(",")):
            kh = N // g
            q = jax.random.normal(key, (1, t, N, D), jnp.bfloat16)
            k, v = (jax.random.normal(jax.random.fold_in(key, i), (1, t, kh, D), jnp.bfloat16) for i in (1, 2))
            do = jax.random.normal(jax.random.fold_in(key, 3), q.shape, jnp.bfloat16)
            tiles = random_lists(jax.random.fold_in(key, 4), kh, n_k, n_k, 1)
            runs = [("tile", "-", 16, ops.Selection(*tiles, n_k))]
            shared = ops.Selection(*(jnp.repeat(x, BS, axis=2) for x in tiles), n_k, granularity="token")
            own = ops.Selection(*random_lists(jax.random.fold_in(key, 5), kh, t, n_k, BS), n_k,
                                granularity="token")
            for rows in map(int, args.token_rows.split(",")):
                runs += [("token", "shared", rows, shared), ("token", "random", rows, own)]
            for level, lists, rows, sel in runs:
                with kernel.tuning(kernel.Tuning(token_rows=rows)):
                    fwd_s, both_s = timed(sel, q, k, v, do)
                print(f"| {t} | {g} | {level} | {lists} | {rows} | {fwd_s * 1e3:.3f} | {both_s * 1e3:.3f} | "
                      f"{flops / fwd_s / 1e12:.0f} | {3.5 * flops / both_s / 1e12:.0f} |", flush=True)


if __name__ == "__main__":
    main()
