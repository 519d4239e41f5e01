"""A ~125M-parameter Llama-style model at sequence length 4096 for one GPU (bf16, cuDNN attention)."""

from sparsetrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig,
                                RunConfig, TrainerConfig)


def get_config() -> RunConfig:
    return RunConfig(
        name="small_125m",
        # 12 layers x 768 wide, GQA 12 query / 4 kv heads; 32k vocab keeps the embedding near GPT-2 size
        # when a real tokenizer is given, and costs little with the byte tokenizer.
        model=ModelConfig(vocab_size=32768, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                          head_dim=64, mlp_dim=2048, max_seq_len=4096,
                          # Measured on one H100 (docs/benchmarks.md): no remat peaks at 37 GB and runs
                          # 8% faster than remat="dots"; use "dots"/"full" for bigger batches.
                          remat="none"),
        data=DataConfig(seq_len=4096, batch_size=16),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=100),
        trainer=TrainerConfig(steps=500, eval_every=250, eval_batches=4, log_every=10),
        checkpoint=CheckpointConfig(every=250, keep=2),
    )
