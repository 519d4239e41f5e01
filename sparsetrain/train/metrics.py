"""Training metrics: model FLOPs and MFU, device memory, and the JSONL + TensorBoard writers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from sparsetrain.config import ModelConfig

# Dense bf16 tensor-core peak per chip, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Matmuls: 2 FLOPs per weight per token (embedding lookup excluded, lm_head included). Attention:
    QK^T and PV cost 2 * 2 * H per (query, key) pair and head; a causal query sees (T+1)/2 keys on
    average, and each layer computes its spec's fraction of those (1.0 dense; less for sparse layers)."""
    d, f, n, k, h = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    matmul = cfg.num_layers * per_layer + d * cfg.vocab_size
    densities = [spec.density(seq_len) for spec in cfg.layer_specs]
    attention = sum(densities) * n * 4 * h * (seq_len + 1) / 2
    return 3 * (2 * matmul + attention)


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    total = sum(v for k, v in PEAK_BF16_FLOPS.items() if k in kind) or None
    return total and total * jax.device_count()


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class Throughput:
    """Step time, tokens/s and MFU over the steps since the last report.

    `restart()` after work that must not count (the compiling first step, evaluation)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float):
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak = peak_flops()
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def report(self) -> dict:
        """Call after blocking on the last step's outputs."""
        values = {}
        if self.steps:
            step_time = (time.perf_counter() - self.start) / self.steps
            values = {"step_time": step_time, "tokens_per_sec": self.tokens_per_step / step_time}
            if self.peak:
                values["mfu"] = self.flops_per_step / step_time / self.peak
        if (mem := peak_memory_bytes()) is not None:
            values["peak_memory_gb"] = mem / 1e9
        self.restart()
        return values


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    A run resumed from the checkpoint of `resumed_step` trains the later steps again, so the records
    of those steps from before (a kill -9, a fall back past a corrupt checkpoint) are dropped first:
    every step appears once."""

    def __init__(self, run_dir: Path, tensorboard: bool, resumed_step: int = 0):
        path = Path(run_dir) / "metrics.jsonl"
        drop_records_after(path, resumed_step)
        self.file = open(path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides events of the steps trained again.
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, step: int, values: dict) -> None:
        values = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the metrics file without the records of steps after `step` (and without a line that a
    kill cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(kept))
    partial.replace(path)   # atomic: a kill now leaves the old or the new file, never half of one
