"""Where a training step's GPU time goes: MFU of the trainer's jitted step, and a table of its top
ops by time from a JAX profiler trace, grouped by kind (matmuls, attention, fusions, collectives).

    PYTHONPATH=. python3 bench/profile_step.py --seq 4096 --batch 16 --json profile.json
    PYTHONPATH=. python3 bench/profile_step.py --seq 4096 --batch 16 trainer.loss_chunk=8192

Runs the step of `--config` (default small_125m, with command-line style overrides) on synthetic
tokens with train.py's XLA flags: the median of `--steps` timed steps gives the step time and MFU;
then `--trace-steps` more steps run under `jax.profiler.trace`, and every GPU kernel of the trace is
attributed to the HLO instruction that launched it and to that instruction's kind, read from the
compiled program's text. Prints the tables as Markdown and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import statistics
import tempfile
import time

import jax

import configs
from bench.steps import train_step_and_state
from sparsetrain.configbase import apply_overrides
from sparsetrain.train.metrics import flops_per_token, peak_flops
from sparsetrain.xla_flags import use_gpu_xla_flags

# One HLO instruction of the optimized module text: its name, then (after the result type) its opcode.
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")


def instruction_kinds(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """({name: kind}, {name: source}) of every instruction of the compiled program. The kind is what
    a newcomer reading the table needs to know (a cuBLAS matmul, cuDNN attention, a Pallas kernel,
    an XLA fusion...); the source is the JAX operation it came from (its op_name metadata)."""
    kinds, sources = {}, {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        if source := re.search(r'op_name="([^"]+)"', line):
            sources[name] = source.group(1).removeprefix("jit(train_step)/")
        target = re.search(r'custom_call_target="([^"]+)"', line)
        target = target.group(1).lower() if target else ""
        if "gemm" in target or "cublas" in target or opcode in ("dot", "convolution"):
            kinds[name] = "matmul"
        elif "cudnn" in target or "fmha" in target:
            kinds[name] = "attention (cuDNN)"
        elif "triton" in target or "mosaic" in target or "pallas" in target:
            kinds[name] = "Pallas kernel"
        elif opcode == "custom-call":
            kinds[name] = f"custom call {target}"
        elif opcode == "fusion":
            kind = re.search(r"kind=(k\w+)", line)
            config = re.search(r'"kind":"(\w+)"', line)   # kCustom fusions: gemm, cuDNN, Triton...
            label = (config.group(1) if config else kind.group(1) if kind else "?")
            kinds[name] = ("matmul" if "gemm" in label.lower() or "cublas" in label.lower()
                           else "attention (cuDNN)" if "cudnn" in label.lower()
                           else {"kLoop": "elementwise fusion", "kInput": "reduction fusion",
                                 "kOutput": "fusion into an output"}.get(label, f"fusion {label}"))
        elif opcode.startswith(("all-", "reduce-scatter", "collective", "send", "recv")):
            kinds[name] = "collective"
        else:
            kinds[name] = opcode
    return kinds, sources


def gpu_kernel_times(trace_dir: str) -> tuple[dict[str, tuple[float, int]], float]:
    """({HLO instruction (or kernel) name: (total ns, launches)}, GPU busy ns) over a trace directory's
    device planes; the kernels of one stream line never overlap, so their sum is busy time."""
    from jax.profiler import ProfileData
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    busy = 0.0
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):   # "XLA Modules", "XLA Ops", "Steps": summaries
                    continue
                for event in line.events:
                    stats = dict(event.stats)
                    op = str(stats.get("hlo_op") or event.name)
                    totals[op][0] += event.duration_ns
                    totals[op][1] += 1
                    busy += event.duration_ns
    return {op: (ns, n) for op, (ns, n) in totals.items()}, busy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small_125m")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="ops printed (the JSON holds all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--hlo", default=None, help="write the compiled step's HLO text here")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of config fields")
    args = parser.parse_args()
    use_gpu_xla_flags()   # before JAX starts its backend: the step compiles as train.py compiles it
    cfg = apply_overrides(configs.load(args.config), [
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"data.batch_size={args.batch}",
        *args.overrides])
    step, state, data = train_step_and_state(cfg, args.batch, args.seq)
    hlo = step.lower(state, data).compile().as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    for _ in range(3):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = flops_per_token(cfg.model, args.seq) * args.seq * args.batch
    peak = peak_flops()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.trace_steps):
                state, metrics = step(state, data)
            jax.block_until_ready(metrics)
        kernels, busy_ns = gpu_kernel_times(trace_dir)
    kinds, sources = instruction_kinds(hlo)
    per_step = lambda ns: ns / args.trace_steps / 1e6   # noqa: E731  ms per step
    by_kind: dict[str, float] = collections.defaultdict(float)
    for op, (ns, _) in kernels.items():
        by_kind[kinds.get(op, "unattributed kernel")] += ns
    summary = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": args.config,
        "seq": args.seq, "batch": args.batch, "overrides": args.overrides,
        "step_ms": 1e3 * step_s, "mfu": flops / step_s / peak if peak else None,
        "model_tflops": flops / step_s / 1e12, "gpu_busy_ms": per_step(busy_ns),
        "by_kind": {k: per_step(ns) for k, ns in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "ops": [{"op": op, "kind": kinds.get(op, "unattributed kernel"), "ms": per_step(ns),
                 "launches": n // args.trace_steps, "source": sources.get(op, "")}
                for op, (ns, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])],
    }
    mfu = f"{100 * summary['mfu']:.1f}%" if summary["mfu"] else "n/a"
    print(f"\n{args.config} T={args.seq} batch {args.batch} {' '.join(args.overrides)}: "
          f"{summary['step_ms']:.1f} ms/step, MFU {mfu}, GPU busy {summary['gpu_busy_ms']:.1f} ms/step\n")
    print("| kind | ms/step | share of busy |\n| --- | --- | --- |")
    for kind, ms in summary["by_kind"].items():
        print(f"| {kind} | {ms:.2f} | {100 * ms / summary['gpu_busy_ms']:.1f}% |")
    print("\n| op | kind | launches/step | ms/step | share of busy | source |\n| --- | --- | --- | --- | --- | --- |")
    for row in summary["ops"][:args.top]:
        print(f"| {row['op']} | {row['kind']} | {row['launches']} | {row['ms']:.2f} | "
              f"{100 * row['ms'] / summary['gpu_busy_ms']:.1f}% | {row['source'][-90:]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
