"""A ~3M-parameter byte-level model that trains on 2 CPU cores in a few minutes (the default job)."""

from sparsetrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig,
                                RunConfig, TrainerConfig)


def get_config() -> RunConfig:
    return RunConfig(
        name="tiny",
        model=ModelConfig(vocab_size=320, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                          head_dim=64, mlp_dim=704, max_seq_len=256,
                          # CPUs have no native bf16 matmul (it is emulated, ~5x slower); GPUs keep bf16.
                          dtype="float32"),
        data=DataConfig(seq_len=256, batch_size=16),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30),
        trainer=TrainerConfig(steps=300, eval_every=100, eval_batches=8),
        checkpoint=CheckpointConfig(every=100, keep=2),
    )
