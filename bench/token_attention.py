"""Token-level block-sparse attention in both loop orders against the tile kernel at the same
number of selected blocks, and against fla-core's NSA kernel (`parallel_nsa`) on the same lists.

    PYTHONPATH=. python3 bench/token_attention.py [--seqs 16384,65536] [--groups 16,4,1]
        [--orders query,key] [--token-rows 16] [--gather 64x4] [--lists random,shared] [--fla]

NSA defaults: every query token (token level) or query tile (tile level) selects 16 key blocks of
64 (random causal blocks, the diagonal always in). B=1, N=16 query heads, K = N / G, D=128, bf16,
causal. Token lists are either "random" (drawn per token) or "shared" (each token takes its
64-token tile's list, as adjacent tokens of a trained selection mostly do). Orders: "query"
(`token_kernel`, P = token_rows // G tokens a tile, looping over the union of their lists) and
"key" (`token_gather_kernel`, a key block gathers the rows that selected it; `--gather RxC`: R
rows a chunk, C chunks a program). `--fla` also runs fla-core's `parallel_nsa` (torch, Triton) on
the same inputs and random lists where G >= 16 (the only groups it runs), selection branch alone.
TFLOP/s count the selected (row, key) pairs, 4*D flops each forward, x3.5 fwd+bwd; "x tile" is
fwd+bwd time over the tile kernel's in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

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


def fla_timed(sel, q, k, v, do):
    """fla-core's parallel_nsa (selection branch only) on the same inputs and lists, and the
    largest difference of its output from ours."""
    import torch
    from fla.ops.nsa.parallel import parallel_nsa

    def to_torch(x, dtype=None):
        t = torch.from_numpy(np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)).cuda()
        return t.to(dtype) if dtype is not None else t
    tq, tk, tv, tdo = (to_torch(x, torch.bfloat16).requires_grad_(True) for x in (q, k, v, do))
    idx = to_torch(jnp.swapaxes(sel.indices, 1, 2)).long()        # [B, T, H, S]
    counts = to_torch(jnp.swapaxes(sel.counts, 1, 2)).long()
    run = lambda: parallel_nsa(tq, tk, tv, block_indices=idx, block_counts=counts, block_size=BS)  # noqa: E731

    def both():
        return torch.autograd.grad(run(), (tq, tk, tv), tdo)

    def median_ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 5)
        return float(np.median(times)) / 1e3
    with torch.no_grad():
        fwd_s = median_ms(run)
        theirs = run().float().cpu().numpy()
    ours = np.asarray(ops.block_sparse_attention(q, k, v, sel, block_size=BS).astype(jnp.float32))
    return fwd_s, median_ms(both), float(np.abs(theirs - ours).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", default="16384,65536")
    parser.add_argument("--groups", default="16,4,1")
    parser.add_argument("--orders", default="query,key")
    parser.add_argument("--token-rows", default="16")
    parser.add_argument("--gather", default="64x4")
    parser.add_argument("--lists", default="random,shared")
    parser.add_argument("--fla", action="store_true")
    args = parser.parse_args(argv)
    key = jax.random.PRNGKey(0)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| T | G | level | lists | order | tuning | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | x tile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        n_k = t // BS
        flops = 4.0 * N * t * TOPK * BS * D
        for g in map(int, args.groups.split(",")):
            kh = N // g
            q = jax.random.normal(key, (1, t, N, D), jnp.bfloat16)
            k, v = (jax.random.normal(jax.random.fold_in(key, i), (1, t, kh, D), jnp.bfloat16) for i in (1, 2))
            do = jax.random.normal(jax.random.fold_in(key, 3), q.shape, jnp.bfloat16)
            tiles = random_lists(jax.random.fold_in(key, 4), kh, n_k, n_k, 1)
            lists = {"shared": ops.Selection(*(jnp.repeat(x, BS, axis=2) for x in tiles), n_k, granularity="token"),
                     "random": ops.Selection(*random_lists(jax.random.fold_in(key, 5), kh, t, n_k, BS), n_k,
                                             granularity="token")}
            runs = [("tile", "-", "-", "-", kernel.Tuning(), ops.Selection(*tiles, n_k))]
            for name in args.lists.split(","):
                for order in args.orders.split(","):
                    if order == "query":
                        runs += [("token", name, order, f"token_rows {r}",
                                  kernel.Tuning(token_order=order, token_rows=int(r)), lists[name])
                                 for r in args.token_rows.split(",") if g & (g - 1) == 0]
                    else:
                        runs += [("token", name, order, f"gather {rc}",
                                  kernel.Tuning(token_order=order, gather_rows=int(rc.split("x")[0]),
                                                gather_chunks=int(rc.split("x")[1])), lists[name])
                                 for rc in args.gather.split(",")]
            tile_s = None
            for level, name, order, label, tune, sel in runs:
                with kernel.tuning(tune):
                    fwd_s, both_s = timed(sel, q, k, v, do)
                tile_s = tile_s or both_s
                print(f"| {t} | {g} | {level} | {name} | {order} | {label} | {fwd_s * 1e3:.3f} | {both_s * 1e3:.3f} | "
                      f"{flops / fwd_s / 1e12:.0f} | {3.5 * flops / both_s / 1e12:.0f} | {both_s / tile_s:.2f} |",
                      flush=True)
            if args.fla and g >= 16:
                fwd_s, both_s, diff = fla_timed(lists["random"], q, k, v, do)
                print(f"| {t} | {g} | fla parallel_nsa | random | - | max abs diff to ours {diff:.3g} | "
                      f"{fwd_s * 1e3:.3f} | {both_s * 1e3:.3f} | {flops / fwd_s / 1e12:.0f} | "
                      f"{3.5 * flops / both_s / 1e12:.0f} | {both_s / tile_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
