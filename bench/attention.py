"""Block-sparse attention benchmark: cuDNN dense causal vs our Pallas kernel on one GPU.

    PYTHONPATH=. python3 bench/attention.py [--seqs 4096,16384,65536] [--head-dim 64] [--json out.json] [--flex]
    PYTHONPATH=. python3 bench/attention.py --fused-scores [--seqs 4096,16384] [--json out.json]

`--fused-scores` times only Seer's fused forward + block scores (`fused_scores`); off the GPU it is a
smoke run (`--seqs 256`: XLA for cuDNN, the kernels interpreted).

Shapes B=1, H=16, D=128 (or --head-dim; the 125M model's is 64), bf16. Densities are fractions of
the causal (query block, key block) tiles: the diagonal plus random tiles below it. Times are
medians over repeated batches of calls, each batch ended by a device sync. TFLOP/s count the
tiles actually computed (4*bs*bs*D per tile forward, x3.5 for forward+backward, the convention of the cuDNN anchor, whose causal forward
counts 2*B*H*T*T*D). Our backward runs 7 tile products to the forward's 2 (dq and dk/dv kernels
each recompute p), so it executes 4.5x the forward's FLOPs, not 3.5x.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for torch (--flex)

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse import kernel as bs_kernel
from pallas_kernels.block_sparse import scores as bs_scores
from sparsetrain import ops

B, H = 1, 16
DENSITIES = (1.0, 0.5, 0.25, 0.12, 0.05)
ON_GPU = jax.default_backend() == "gpu"  # off the GPU only a smoke run makes sense (interpret)


def median_time(fn, *args, reps: int = 7, batch_s: float = 0.03) -> float:
    """Median seconds per call: warm-up (compile), then `reps` batches of back-to-back calls."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    inner = max(1, min(50, int(batch_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def causal_random_mask(rng, t: int, bs: int, density: float) -> np.ndarray:
    """bool [1, H, n, n]: the diagonal plus random causal tiles, `density` of the causal tiles."""
    n = t // bs
    causal = np.tri(n, dtype=bool)
    n_causal = n * (n + 1) // 2
    if density >= 1.0:
        return np.broadcast_to(causal, (1, H, n, n)).copy()
    p = max(density * n_causal - n, 0) / (n_causal - n)
    mask = (rng.random((1, H, n, n)) < p) & causal
    return mask | np.eye(n, dtype=bool)


def attention_fns(bs: int):
    fwd = jax.jit(lambda q, k, v, m: ops.block_sparse_attention(q, k, v, m, block_size=bs))

    @jax.jit
    def fwd_bwd(q, k, v, m, do):
        return jax.vjp(lambda q, k, v: ops.block_sparse_attention(q, k, v, m, block_size=bs), q, k, v)[1](do)
    return fwd, fwd_bwd


def cudnn_fns():
    attn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation="cudnn")
    return jax.jit(attn), jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))


def list_build_fn(t: int, bs: int, head_dim: int):
    """The index-list construction alone (forward lists + transposed lists), XLA side."""
    dims = common.Dims(B, t, t, H, H, H, head_dim, bs)
    possible, full = common.tile_classes(dims, True)

    @jax.jit
    def build(m):
        m = m & possible
        return common.block_lists(m, full), common.transposed_block_lists(m, full)
    return build


def bench_seq(t: int, rng, args, rows: list) -> None:
    D = args.head_dim
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v, do = (jax.random.normal(kk, (B, t, H, D), jnp.bfloat16) for kk in keys)
    flops_causal = 2 * B * H * t * t * D
    c_fwd, c_bwd = cudnn_fns()
    t_cf = median_time(c_fwd, q, k, v)
    t_cb = median_time(c_bwd, q, k, v, do)
    rows.append(dict(T=t, impl="cudnn dense causal", density=1.0, bs=None, fwd_ms=t_cf * 1e3,
                     fwdbwd_ms=t_cb * 1e3, fwd_tflops=flops_causal / t_cf / 1e12,
                     fwdbwd_tflops=3.5 * flops_causal / t_cb / 1e12, fwd_x=1.0, fwdbwd_x=1.0))
    print(f"T={t} cuDNN fwd {t_cf*1e3:.3f} ms, fwd+bwd {t_cb*1e3:.3f} ms", flush=True)

    bs = args.block
    fwd, fwd_bwd = attention_fns(bs)
    for density in args.densities:
        mask = jnp.asarray(causal_random_mask(rng, t, bs, density))
        tiles = int(mask.sum())
        flops = tiles * 4 * bs * bs * D
        t_f = median_time(fwd, q, k, v, mask)
        t_b = median_time(fwd_bwd, q, k, v, mask, do)
        n = t // bs
        real = tiles / (H * n * (n + 1) // 2)
        rows.append(dict(T=t, impl=f"block-sparse bs{bs}", density=real, bs=bs, fwd_ms=t_f * 1e3,
                         fwdbwd_ms=t_b * 1e3, fwd_tflops=flops / t_f / 1e12,
                         fwdbwd_tflops=3.5 * flops / t_b / 1e12, fwd_x=t_f / t_cf, fwdbwd_x=t_b / t_cb))
        print(f"  density {real:.3f}: fwd {t_f*1e3:.3f} ms ({flops/t_f/1e12:.0f} TF/s), "
              f"fwd+bwd {t_b*1e3:.3f} ms ({3.5*flops/t_b/1e12:.0f} TF/s)", flush=True)
        if density == args.densities[-1]:
            t_l = median_time(list_build_fn(t, bs, D), mask)
            rows.append(dict(T=t, impl=f"index lists (fwd+transposed) bs{bs}", density=real, bs=bs,
                             fwd_ms=t_l * 1e3))
            print(f"  index lists alone: {t_l*1e3:.3f} ms", flush=True)

    s_all = jax.jit(lambda q, k: ops.block_attention_scores(q, k, block_size=bs))
    s_lse = jax.jit(lambda q, k: bs_scores.row_lse(q, k, block_size=bs, interpret=not ON_GPU))
    t_s, t_p1 = median_time(s_all, q, k), median_time(s_lse, q, k)
    rows.append(dict(T=t, impl=f"block_attention_scores bs{bs}", density=1.0, bs=bs, fwd_ms=t_s * 1e3,
                     fwd_x=t_s / t_cf, lse_pass_ms=t_p1 * 1e3))
    print(f"  block_attention_scores {t_s*1e3:.3f} ms = {t_s/t_cf:.2f}x cuDNN fwd "
          f"(pass 1 LSE {t_p1*1e3:.3f} ms, pass 2 + normalise {(t_s-t_p1)*1e3:.3f} ms)", flush=True)


def fused_scores(t: int, args, rows: list) -> None:
    """Issue 10's fused path for Seer distillation: what the block ground truth costs on top of the
    dense forward when it comes out of that forward (`ops.attention_with_block_scores`), against
    the two extra passes of `block_attention_scores`. Off the GPU a smoke run: XLA instead of
    cuDNN, the kernels interpreted."""
    bs = args.block
    keys = jax.random.split(jax.random.key(t), 3)
    q, k, v = (jax.random.normal(kk, (B, t, H, args.head_dim), jnp.bfloat16) for kk in keys)
    kernel = dict(block_size=bs, impl="pallas", interpret=not ON_GPU)
    every_tile = common.every_tile(q, k, bs)
    dense = "cudnn" if ON_GPU else "xla"
    labels = {"cudnn": "cuDNN dense causal fwd", "two_pass": "block_attention_scores (two passes)",
              "ours": "our kernel dense causal fwd", "fused": "fused fwd + block scores"}
    fns = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dense),
        "two_pass": lambda q, k, v: ops.block_attention_scores(q, k, **kernel),
        "ours": lambda q, k, v: ops.block_sparse_attention(q, k, v, every_tile, **kernel),
        "fused": lambda q, k, v: ops.attention_with_block_scores(q, k, v, **kernel),
    }
    fns = {key: jax.jit(fn) for key, fn in fns.items()}
    ms = {key: 1e3 * median_time(fn, q, k, v) for key, fn in fns.items()}
    for key, label in labels.items():
        rows.append(dict(T=t, impl=f"{label} bs{bs}", density=1.0, bs=bs, fwd_ms=ms[key],
                         fwd_x=ms[key] / ms["cudnn"]))
    o, got = fns["fused"](q, k, v)
    diff_scores = float(jnp.abs(got - fns["two_pass"](q, k, v)).max())
    diff_o = float(jnp.abs(o.astype(jnp.float32) - fns["cudnn"](q, k, v).astype(jnp.float32)).max())
    extra = {base: (ms["fused"] - ms[base]) / ms["cudnn"] for base in ("cudnn", "ours")}
    rows.append(dict(T=t, impl=f"fused scores extra cost bs{bs}", density=1.0, bs=bs,
                     extra_vs_cudnn_x=extra["cudnn"], extra_vs_our_fwd_x=extra["ours"],
                     two_pass_x=ms["two_pass"] / ms["cudnn"], rowmax_bytes=4 * B * H * t * (-(-t // bs)),
                     max_abs_diff_scores=diff_scores, max_abs_diff_o_vs_cudnn=diff_o))
    print(f"T={t}: " + ", ".join(f"{label} {ms[key]:.3f} ms" for key, label in labels.items()), flush=True)
    print(f"  scores' extra cost (x cuDNN fwd; goal <= 0.6): fused - cuDNN {extra['cudnn']:.2f}, "
          f"fused - our fwd {extra['ours']:.2f}, two passes {ms['two_pass'] / ms['cudnn']:.2f}; "
          f"max |scores - two-pass| {diff_scores:.2g}, max |o - cuDNN| {diff_o:.2g}", flush=True)


def flex_like(rng, args, rows: list, t: int = 16384, density: float = 0.117):
    """FlexAttention's published case: 128x128 blocks, 11.7% of causal blocks (random + diagonal)."""
    keys = jax.random.split(jax.random.key(7), 4)
    q, k, v, do = (jax.random.normal(kk, (B, t, H, args.head_dim), jnp.bfloat16) for kk in keys)
    mask128 = causal_random_mask(rng, t, 128, density)
    real = mask128.sum() / (H * (t // 128) * (t // 128 + 1) // 2)
    results = {}
    # The same mask run with 128 tiles, and with 64 tiles (each 128 block = 2x2 tiles of 64; the
    # tile above the diagonal inside a diagonal block is dropped as impossible).
    for bs, mask in ((128, mask128), (64, np.repeat(np.repeat(mask128, 2, 2), 2, 3))):
        fwd, fwd_bwd = attention_fns(bs)
        m = jnp.asarray(mask)
        t_f, t_b = median_time(fwd, q, k, v, m), median_time(fwd_bwd, q, k, v, m, do)
        results[bs] = (t_f, t_b, fwd(q, k, v, m))
        rows.append(dict(T=t, impl=f"flex-like mask, our kernel bs{bs}", density=float(real), bs=bs,
                         fwd_ms=t_f * 1e3, fwdbwd_ms=t_b * 1e3))
        print(f"flex-like ({real:.3f} of causal 128-blocks) ours bs{bs}: fwd {t_f*1e3:.3f} ms, "
              f"fwd+bwd {t_b*1e3:.3f} ms", flush=True)
    if args.flex:
        try:
            flex_torch(mask128, q, k, v, do, results[64][2], rows, t, float(real))
        except Exception as e:  # the comparison is optional; say why it is missing
            print(f"FlexAttention run failed: {type(e).__name__}: {e}", flush=True)


def flex_torch(mask128, q, k, v, do, ours, rows, t: int, real: float):
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    dev = "cuda"
    n = t // 128
    # Partial blocks (mask_mod applied): the diagonal; full blocks: the selected ones below it.
    below = mask128 & ~np.eye(n, dtype=bool)
    full_idx = np.argsort(~below, axis=-1, kind="stable").astype(np.int32)  # selected first, ascending
    as_t = lambda x: torch.as_tensor(np.ascontiguousarray(x), device=dev)  # noqa: E731
    block_mask = BlockMask.from_kv_blocks(
        as_t(np.ones((B, H, n), np.int32)),
        as_t(np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (B, H, n, n))),
        as_t(below.sum(-1).astype(np.int32)), as_t(full_idx),
        BLOCK_SIZE=128, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, seq_lengths=(t, t))
    to_t = lambda x: torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous()  # noqa: E731  BTHD -> BHTD
    tq, tk, tv, tdo = (to_t(x) for x in (q, k, v, do))
    flex = torch.compile(flex_attention)

    def timed(fn, reps=7):
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    with torch.no_grad():
        o = flex(tq, tk, tv, block_mask=block_mask)
        t_f = timed(lambda: flex(tq, tk, tv, block_mask=block_mask))
    gq, gk, gv = (x.detach().requires_grad_() for x in (tq, tk, tv))
    t_b = timed(lambda: flex(gq, gk, gv, block_mask=block_mask).backward(tdo))
    diff = (o.permute(0, 2, 1, 3).float().cpu().numpy() - np.asarray(ours, np.float32))
    rows.append(dict(T=t, impl="PyTorch FlexAttention (same mask, 128 blocks)", density=real, bs=128,
                     fwd_ms=t_f * 1e3, fwdbwd_ms=t_b * 1e3, max_abs_diff_vs_ours=float(np.abs(diff).max())))
    print(f"FlexAttention: fwd {t_f*1e3:.3f} ms, fwd+bwd {t_b*1e3:.3f} ms; "
          f"max |o_flex - o_ours| = {np.abs(diff).max():.3g}", flush=True)


def sweep(rng, args, rows: list, t: int = 16384, density: float = 0.12):
    """Launch parameters at T=16k, 12% density: forward and backward times per (warps, stages)."""
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v, do = (jax.random.normal(kk, (B, t, H, args.head_dim), jnp.bfloat16) for kk in keys)
    mask = jnp.asarray(causal_random_mask(rng, t, args.block, density))
    for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
        try:
            with bs_kernel.tuning(bs_kernel.Tuning(warps, stages, warps, stages)):
                fwd, fwd_bwd = attention_fns(args.block)  # traced inside the context
                t_f = median_time(fwd, q, k, v, mask)
                t_b = median_time(fwd_bwd, q, k, v, mask, do)
        except jax.errors.JaxRuntimeError as e:  # e.g. too much shared memory for this block size
            print(f"sweep warps={warps} stages={stages}: failed: {str(e).splitlines()[0]}", flush=True)
            continue
        rows.append(dict(T=t, impl=f"sweep warps={warps} stages={stages}", density=density,
                         bs=args.block, fwd_ms=t_f * 1e3, fwdbwd_ms=t_b * 1e3))
        print(f"sweep warps={warps} stages={stages}: fwd {t_f*1e3:.3f} ms, fwd+bwd {t_b*1e3:.3f} ms",
              flush=True)


def print_table(rows: list) -> None:
    print("\n| T | implementation | density | fwd ms | TF/s | x cuDNN | fwd+bwd ms | TF/s | x cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, key, f: (f % r[key]) if r.get(key) is not None else "–"  # noqa: E731
    for r in rows:
        print(f"| {r['T']} | {r['impl']} | {r['density']:.3f} | {fmt(r, 'fwd_ms', '%.3f')} | "
              f"{fmt(r, 'fwd_tflops', '%.0f')} | {fmt(r, 'fwd_x', '%.2f')} | {fmt(r, 'fwdbwd_ms', '%.3f')} | "
              f"{fmt(r, 'fwdbwd_tflops', '%.0f')} | {fmt(r, 'fwdbwd_x', '%.2f')} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="4096,16384,65536")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--flex", action="store_true", help="also time PyTorch FlexAttention (needs torch)")
    p.add_argument("--flex-seq", type=int, default=16384, help="T of the FlexAttention-like case")
    p.add_argument("--sweep", action="store_true", help="time a few (num_warps, num_stages) pairs")
    p.add_argument("--fused-scores", action="store_true",
                   help="only time the fused forward + block scores against cuDNN and the two-pass scores")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    args.densities = [float(x) for x in args.densities.split(",")]
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, device {dev.device_kind}, B={B} H={H} D={args.head_dim} bf16", flush=True)
    rng = np.random.default_rng(0)
    rows: list = []

    def save():  # after every section, so a run cut short still leaves its numbers
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(jax=jax.__version__, device=dev.device_kind, head_dim=args.head_dim, rows=rows), f,
                          indent=1)
    if args.fused_scores:
        for t in (int(x) for x in args.seqs.split(",")):
            fused_scores(t, args, rows)
            save()
        print_table(rows)
        return
    if args.sweep:
        sweep(rng, args, rows, t=args.flex_seq)
        save()
    for t in (int(x) for x in args.seqs.split(",")):
        bench_seq(t, rng, args, rows)
        save()
    flex_like(rng, args, rows, t=args.flex_seq)
    save()
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
