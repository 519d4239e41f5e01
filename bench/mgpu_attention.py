"""One GPU run for the Mosaic GPU block-sparse kernels: environment, correctness, timings.

    PYTHONPATH=. python3 bench/mgpu_attention.py [--json out.json] [--stages 0,1,2,3,4]

Each stage runs in its own child process with a time limit, so that a crash or a hung kernel
(a barrier that never completes) costs only that stage: the child prints its full traceback (or,
when it hangs, the Python stack of every thread) and the next stage still runs.

  0  device, versions, CUDA runtime (ptxas 12.8.0-12.9.0 miscompiles causal masks, says JAX)
  1  JAX's stock FA3 forward (ops/gpu/attention_mgpu.py), fp16, B=1 H=16 T=16384 D=128, causal,
     block_q 64 / block_kv 128 / 2 steps: the environment check and the anchor time
  2  our MGPU forward vs the reference on small shapes, 1 and 2 compute warpgroups: max abs
     errors of o, lse and (through the Mosaic GPU backward) dq/dk/dv
  3  forward times at T=16384, D=128 and 64, densities 1.0/0.5/0.12/0.05 (causal random tiles
     plus the diagonal): MGPU (2 and 1 compute wgs) vs our Triton forward vs cuDNN dense causal;
     TFLOP/s count the computed tiles (4 * 64 * 64 * D each)
  4  forward+backward (and the forward at full density) at FWD_BWD_SHAPES: impl="mosaic_gpu"
     (Mosaic GPU backward, and with the Triton backward) and impl="pallas" beside cuDNN and
     tokamax's Mosaic GPU kernel (dense causal), with each row's ratio to cuDNN
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

STAGE_LIMIT_S = {0: 45, 1: 75, 2: 360, 3: 200, 4: 420}  # stage 2: ~30 s a case (compiles), 10 cases
T_LONG, DENSITIES, BS = 16384, (1.0, 0.5, 0.12, 0.05), 64


def stage_env(out: dict) -> None:
    import jax
    import jaxlib

    from jax._src.lib import cuda_versions
    out.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
               devices=[str(d) for d in jax.devices()],
               device_kind=jax.devices()[0].device_kind)
    if cuda_versions is not None:
        rt = cuda_versions.cuda_runtime_get_version()
        out.update(cuda_runtime=rt, cudnn=cuda_versions.cudnn_get_version())
        if 12080 <= rt < 12091:
            print("WARNING: CUDA runtime in [12.8.0, 12.9.1): JAX disables causal masking in its FA3 "
                  "kernel there (ptxas miscompilation); our masked tiles may be affected too")
    print(json.dumps(out, indent=1))


def stage_stock_fa3(out: dict) -> None:
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

    from bench.attention import median_time
    b, h, t, d = 1, 16, T_LONG, 128
    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float16) for kk in jax.random.split(jax.random.key(0), 3))
    cfg = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    fn = jax.jit(lambda q, k, v: fa3.attention(q, k, v, cfg))
    sec = median_time(fn, q, k, v)
    flops = 2 * b * h * t * t * d  # causal half of 4 * T^2 * D
    out.update(stock_fa3_fp16_causal_ms=sec * 1e3, stock_fa3_tflops=flops / sec / 1e12)
    print(f"stock FA3 fp16 causal T={t} D={d}: {sec*1e3:.3f} ms = {flops/sec/1e12:.0f} TFLOP/s")


def _summary(e: Exception) -> str:
    """The exception's type and message (the full traceback is printed above it)."""
    return f"{type(e).__name__}: {e}"[:800]


def _max_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    if not np.array_equal(np.isfinite(a), fin):
        return float("inf")  # non-finite where the reference is finite (or the reverse)
    return float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0


def stage_correctness(out: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.block_sparse import reference
    from pallas_kernels.block_sparse_mgpu import MgpuTuning, kernel, tuning
    cases = [  # (name, T, S, N, K, D, dtype, causal, mask density)
        ("tiny D64", 128, 128, 1, 1, 64, jnp.bfloat16, True, 1.0),
        ("D128 GQA4", 512, 512, 4, 1, 128, jnp.bfloat16, True, 0.4),
        ("D64 fp16 GQA2", 512, 512, 4, 2, 64, jnp.float16, True, 0.4),
        ("ragged S>T", 200, 470, 4, 2, 128, jnp.bfloat16, True, 0.5),
        ("non-causal odd nQ", 320, 320, 2, 2, 64, jnp.bfloat16, False, 0.4),
    ]
    rng = np.random.default_rng(0)
    out["cases"] = []
    for wgs in (1, 2):  # one compute wg first: the simpler pipeline (no schedule barrier)
        for name, t, s, n, kh, d, dt, causal, dens in cases:
            keys = jax.random.split(jax.random.key(t + d), 4)
            q = (1.5 * jax.random.normal(keys[0], (1, t, n, d))).astype(dt)
            k, v = (jax.random.normal(kk, (1, s, kh, d)).astype(dt) for kk in keys[1:3])
            do = jax.random.normal(keys[3], (1, t, n, d)).astype(dt)
            mask = jnp.asarray(rng.random((1, kh, -(-t // 64), -(-s // 64))) < dens)
            label = f"wgs={wgs} {name}"
            print(f"{label}: running", flush=True)
            try:
                def run(q, k, v, wgs=wgs, mask=mask, causal=causal):
                    with tuning(MgpuTuning(compute_wgs=wgs)):
                        return kernel.block_sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
                (o, lse), pull = jax.vjp(jax.jit(run), q, k, v)
                grads = pull((do, jnp.zeros_like(lse)))
                f32 = [x.astype(jnp.float32) for x in (q, k, v)]
                ref = lambda q, k, v: reference.block_sparse_attention(  # noqa: E731
                    q, k, v, mask, causal=causal, return_lse=True)
                (o_r, lse_r), pull_r = jax.vjp(ref, *f32)
                grads_r = pull_r((do.astype(jnp.float32), jnp.zeros_like(lse_r)))
                row = dict(case=label, o=_max_err(o, o_r), lse=_max_err(lse, lse_r),
                           o_scale=float(jnp.abs(o_r).max()),
                           **{g: _max_err(x, y) for g, x, y in zip(("dq", "dk", "dv"), grads, grads_r)})
            except Exception as e:
                traceback.print_exc()
                row = dict(case=label, error=_summary(e))
            out["cases"].append(row)
            print(json.dumps(row), flush=True)


def _attention_fwd(impl: str, wgs: int | None = None):
    import jax

    from pallas_kernels.block_sparse_mgpu import MgpuTuning, tuning
    from sparsetrain import ops

    def fwd(q, k, v, m):
        if wgs is None:
            return ops.block_sparse_attention(q, k, v, m, block_size=BS, impl=impl)
        with tuning(MgpuTuning(compute_wgs=wgs)):
            return ops.block_sparse_attention(q, k, v, m, block_size=BS, impl=impl)
    return jax.jit(fwd)


def stage_forward_times(out: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.attention import B, H, causal_random_mask, cudnn_fns, median_time
    rng = np.random.default_rng(0)
    impls = {"mosaic_gpu wgs=2": _attention_fwd("mosaic_gpu", 2), "mosaic_gpu wgs=1": _attention_fwd("mosaic_gpu", 1),
             "pallas (triton)": _attention_fwd("pallas")}
    out["rows"] = []
    for d in (128, 64):
        q, k, v = (jax.random.normal(kk, (B, T_LONG, H, d), jnp.bfloat16)
                   for kk in jax.random.split(jax.random.key(d), 3))
        t_cudnn = median_time(cudnn_fns()[0], q, k, v, reps=5)
        flops_causal = 2 * B * H * T_LONG * T_LONG * d
        print(f"D={d} cuDNN dense causal fwd {t_cudnn*1e3:.3f} ms ({flops_causal/t_cudnn/1e12:.0f} TF/s)", flush=True)
        out["rows"].append(dict(D=d, impl="cudnn dense causal", ms=t_cudnn * 1e3, tflops=flops_causal / t_cudnn / 1e12))
        for density in DENSITIES:
            mask = jnp.asarray(causal_random_mask(rng, T_LONG, BS, density))
            tiles = int(mask.sum())
            flops = tiles * 4 * BS * BS * d
            for name, fn in impls.items():
                try:
                    sec = median_time(fn, q, k, v, mask, reps=5)
                    row = dict(D=d, density=density, impl=name, ms=sec * 1e3, tflops=flops / sec / 1e12,
                               x_cudnn=sec / t_cudnn)
                    print(f"  D={d} density {density}: {name:18s} {sec*1e3:7.3f} ms {flops/sec/1e12:5.0f} TF/s "
                          f"{sec/t_cudnn:5.2f}x cuDNN", flush=True)
                except Exception as e:
                    traceback.print_exc()
                    row = dict(D=d, density=density, impl=name, error=_summary(e))
                out["rows"].append(row)
        # One check at the largest shape: MGPU vs Triton outputs on the last (sparsest) mask.
        diff = jnp.abs(impls["mosaic_gpu wgs=2"](q, k, v, mask).astype(jnp.float32)
                       - impls["pallas (triton)"](q, k, v, mask).astype(jnp.float32)).max()
        out[f"max_abs_diff_mgpu_vs_triton_D{d}"] = float(diff)
        print(f"  D={d}: max |MGPU - Triton| at density {DENSITIES[-1]}: {float(diff):.3g}", flush=True)


# (T, query heads, kv heads, D, densities): the goals (16k D=128 full and 12%, 16k D=64 at
# GQA 3, 64k at 5%).
FWD_BWD_SHAPES = [(16384, 16, 16, 128, (1.0, 0.12)), (16384, 12, 4, 64, (1.0,)), (65536, 16, 16, 128, (0.05,))]


def _anchors():
    """name -> attention(q, k, v) of the dense causal anchors: cuDNN, and tokamax's Mosaic GPU
    kernel when its wheel is there."""
    import jax
    out = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")}
    try:
        import tokamax
        out["tokamax mosaic"] = lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=True, implementation="mosaic")
    except Exception as e:  # noqa: BLE001 (an optional anchor: say why it is missing)
        print(f"tokamax anchor unavailable: {_summary(e)}", flush=True)
    return out


def _ours(impl: str, backward: str, backward_wgs: int = 1):
    from pallas_kernels.block_sparse_mgpu import MgpuTuning, tuning
    from sparsetrain import ops

    def attn(q, k, v, m):
        with tuning(MgpuTuning(backward=backward, backward_wgs=backward_wgs)):
            return ops.block_sparse_attention(q, k, v, m, block_size=BS, impl=impl)
    return attn


def stage_fwd_bwd(out: dict) -> None:
    """Forward and forward+backward times of our kernels beside the anchors, same call, same
    shapes. TFLOP/s count computed tiles (4 * 64 * 64 * D each, x3.5 for fwd+bwd; the anchors'
    causal 2 * T^2 * D per head)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.attention import causal_random_mask, median_time
    rng = np.random.default_rng(0)
    ours = {"mosaic_gpu": _ours("mosaic_gpu", "mosaic_gpu"), "mosaic_gpu bwd wgs=2": _ours("mosaic_gpu", "mosaic_gpu", 2),
            "mosaic_gpu fwd + triton bwd": _ours("mosaic_gpu", "triton"), "pallas (triton)": _ours("pallas", "mosaic_gpu")}
    out["rows"] = []

    def timed(label, fn_fwd, fn_bwd, args, flops, anchor_s=None, with_fwd=True):
        row = dict(label=label)
        try:
            if with_fwd:
                sec = median_time(jax.jit(fn_fwd), *args, reps=5)
                row.update(fwd_ms=sec * 1e3, fwd_tflops=flops / sec / 1e12)
            sec = median_time(jax.jit(fn_bwd), *args, reps=5)
            row.update(fwd_bwd_ms=sec * 1e3, fwd_bwd_tflops=3.5 * flops / sec / 1e12)
            if anchor_s:
                row["x_cudnn_fwd_bwd"] = sec / anchor_s
        except Exception as e:  # noqa: BLE001 (one failing case must not hide the others)
            traceback.print_exc()
            row["error"] = _summary(e)
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        return row

    for t, h, kh, d, densities in FWD_BWD_SHAPES:
        keys = jax.random.split(jax.random.key(t + d), 4)
        q, do = (jax.random.normal(kk, (1, t, h, d), jnp.bfloat16) for kk in keys[:2])
        k, v = (jax.random.normal(kk, (1, t, kh, d), jnp.bfloat16) for kk in keys[2:])
        first = t == 16384 and d == 128
        causal_flops = 2 * h * t * t * d
        cudnn_s = None
        for name, attn in _anchors().items():
            row = timed(f"T={t} H={h}/{kh} D={d} {name} dense causal", attn,
                        lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do), (q, k, v, do),
                        causal_flops, cudnn_s, with_fwd=first)
            if name == "cudnn":
                cudnn_s = row.get("fwd_bwd_ms", 0) / 1e3 or None
        for density in densities:
            mask = jnp.asarray(causal_random_mask(rng, t, BS, density)[:, :kh])
            flops = int(mask.sum()) * (h // kh) * 4 * BS * BS * d
            for name, attn in ours.items():
                timed(f"T={t} H={h}/{kh} D={d} density {density} {name}", lambda q, k, v, do, attn=attn: attn(q, k, v, mask),
                      lambda q, k, v, do, attn=attn: jax.vjp(lambda q, k, v: attn(q, k, v, mask), q, k, v)[1](do),
                      (q, k, v, do), flops, cudnn_s, with_fwd=first and density == 1.0)


STAGES = {0: stage_env, 1: stage_stock_fa3, 2: stage_correctness, 3: stage_forward_times, 4: stage_fwd_bwd}


def run_child(stage: int, part: str) -> None:
    """One stage in this process; on a hang the stack is dumped and the process exits."""
    faulthandler.dump_traceback_later(STAGE_LIMIT_S[stage] - 5, exit=True)
    out: dict = {}
    try:
        STAGES[stage](out)
    except Exception:
        traceback.print_exc()
        out["error"] = traceback.format_exc()[-2000:]
    finally:
        with open(part, "w") as f:
            json.dump(out, f, default=str)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--stages", default="0,1,2,3,4")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return run_child(args.child, args.part)
    results = {}
    for stage in (int(s) for s in args.stages.split(",")):
        print(f"\n===== stage {stage}: {STAGES[stage].__name__} =====", flush=True)
        t0 = time.time()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            part = tmp.name
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(stage), "--part", part],
                                  timeout=STAGE_LIMIT_S[stage] + 10, env=os.environ)
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = "killed after the time limit (hung?)"
        with open(part) as f:
            text = f.read()
        os.unlink(part)
        results[f"stage{stage}"] = dict(json.loads(text) if text else {}, status=status,
                                        seconds=round(time.time() - t0, 1))
        print(f"===== stage {stage}: {status}, {time.time() - t0:.0f} s =====", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
