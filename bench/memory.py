"""Peak device memory and time of the training step per batch size, and the largest batch that fits.

    PYTHONPATH=. python3 bench/memory.py --seq 16384 --remat none --loss-chunk 0 --batches 1,2,4,8
    PYTHONPATH=. python3 bench/memory.py --seq 16384 --remat full --loss-chunk 8192 --batches 1,2,4,8,16
    PYTHONPATH=. python3 bench/memory.py --seq 65536 --context 2 --remat full --loss-chunk 8192 --batches 1
    PYTHONPATH=. python3 bench/memory.py --seq 131072 --context 4 --kv-exchange ring --remat full --batches 1

`--plan-only` compiles each step without running it and reports XLA's memory plan (per device), e.g.
on CPU with fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) to compare the
context-parallel K/V exchanges (`--kv-exchange`) of a small config.

Each batch size runs seven train steps of the 125M config (or `--config`) on synthetic tokens in its
own process (median time of the last five), so every peak is that batch's alone and an
out-of-memory error ends only that process. From the two largest batches that fit it derives the
memory rule of thumb: bytes per token per layer (peak growth per added token, over the layers).
Batch sizes run in the given order and stop at the first that does not fit. Prints one line per
batch size and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

GIB = 2 ** 30


def measure(config: str, seq: int, batch: int, remat: str, loss_chunk: int, context: int, kv_exchange: str,
            plan_only: bool, overrides: list[str]) -> dict:
    """Peak bytes (the largest over devices) and median time of train steps at [batch, seq] in this
    process, and XLA's compile-time plan; `context` > 1 splits each sequence over that many devices,
    exchanging K/V by `kv_exchange`. plan_only: XLA's plan alone (nothing runs)."""
    # Imported here, in the child only: the parent must not start a backend that holds device memory.
    import contextlib
    import statistics
    import time

    from sparsetrain.xla_flags import use_gpu_xla_flags
    use_gpu_xla_flags()   # before JAX starts: the step compiles as train.py compiles it
    import jax

    import configs
    from bench.steps import train_step_and_state
    from sparsetrain.config import MeshConfig
    from sparsetrain.configbase import apply_overrides
    from sparsetrain.train.sharding import batch_sharding, make_mesh, on_mesh, replicated

    cfg = apply_overrides(configs.load(config), [
        f"model.max_seq_len={seq}", f"data.seq_len={seq}", f"data.batch_size={batch}",
        f"model.remat={remat}", f"trainer.loss_chunk={loss_chunk}", f"mesh.context={context}",
        f"mesh.kv_exchange={kv_exchange}", *overrides])
    step, state, data = train_step_and_state(cfg, batch, seq)
    mesh_context = contextlib.nullcontext()
    if context > 1:   # parameters replicated, batch split over data, sequences over context
        mesh = make_mesh(MeshConfig(data=-1, context=context))
        state, data = jax.device_put(state, replicated(mesh)), jax.device_put(data, batch_sharding(mesh))
        mesh_context = on_mesh(mesh, cfg.mesh)
    times = []
    with mesh_context:
        plan = step.lower(state, data).compile().memory_analysis()
        if plan_only:
            return {"batch": batch, "num_layers": cfg.model.num_layers, "xla_temp_gib": plan.temp_size_in_bytes / GIB,
                    "xla_argument_gib": plan.argument_size_in_bytes / GIB}
        for _ in range(7):   # 2 to compile and warm up, 5 timed
            start = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    return {"batch": batch, "num_layers": cfg.model.num_layers, "peak_gib": peak / GIB,
            "xla_temp_gib": plan.temp_size_in_bytes / GIB,
            "step_ms": 1e3 * statistics.median(times[2:]), "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small_125m")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--loss-chunk", type=int, default=0, help="trainer.loss_chunk (0: whole logits)")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes, ascending")
    parser.add_argument("--context", type=int, default=1, help="mesh.context (devices per sequence)")
    parser.add_argument("--kv-exchange", default="all_gather", choices=("all_gather", "ring"), help="mesh.kv_exchange")
    parser.add_argument("--plan-only", action="store_true", help="XLA's memory plan per device; run no step")
    parser.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: one batch
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.seq, args.one, args.remat, args.loss_chunk, args.context,
                                 args.kv_exchange, args.plan_only, args.overrides)))
        return
    summary = {"config": args.config, "seq": args.seq, "remat": args.remat, "loss_chunk": args.loss_chunk,
               "context": args.context, "kv_exchange": args.kv_exchange, "runs": [], "largest_batch": 0}
    for batch in map(int, args.batches.split(",")):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", str(batch)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            oom = "RESOURCE_EXHAUSTED" in child.stderr or "out of memory" in child.stderr.lower()
            print(f"batch {batch}: " + ("out of memory" if oom else f"failed\n{child.stderr[-2000:]}"))
            summary["runs"].append({"batch": batch, "error": "oom" if oom else "failed"})
            break
        run = json.loads(child.stdout.strip().splitlines()[-1])
        if args.plan_only:
            print(f"batch {batch}: XLA plan per device: temp {run['xla_temp_gib']:.3f} GiB, "
                  f"arguments {run['xla_argument_gib']:.3f} GiB", flush=True)
            summary["runs"].append(run)
            continue
        print(f"batch {batch}: peak {run['peak_gib']:.2f} GiB (XLA temp {run['xla_temp_gib']:.2f} GiB), "
              f"{run['step_ms']:.1f} ms/step, loss {run['loss']:.3f}", flush=True)
        summary["runs"].append(run)
        summary["largest_batch"] = batch
    fits = [run for run in summary["runs"] if "error" not in run]
    if len(fits) >= 2:
        # The memory rule of thumb: peak growth per added token per layer between the two largest
        # batches that fit (weights and optimizer state cancel out; so does the loss's with loss_chunk > 0).
        small, large = fits[-2:]
        tokens = (large["batch"] - small["batch"]) * args.seq * large["num_layers"]
        summary["bytes_per_token_per_layer"] = (large["peak_gib"] - small["peak_gib"]) * GIB / tokens
        print(f"{summary['bytes_per_token_per_layer']:.0f} bytes per token per layer (peak growth, "
              f"batch {small['batch']} -> {large['batch']})")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
