"""Small run configs for trainer tests: seconds per run on 2 CPU cores."""

import json

import configs
from sparsetrain.configbase import apply_overrides

SMALL = [
    "data.seq_len=64", "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=16", "model.mlp_dim=128", "model.max_seq_len=64", "model.vocab_size=320",
    "data.batch_size=8", "data.max_documents=120", "trainer.progress_bar=false",
    "optimizer.warmup_steps=5", "trainer.log_every=1", "trainer.eval_batches=2", "tensorboard=false",
]


def small_config(tmp_path, *overrides):
    return apply_overrides(configs.load("tiny"), SMALL + [f"run_dir={tmp_path}", *overrides])


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
