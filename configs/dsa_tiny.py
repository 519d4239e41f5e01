"""configs/dsa_125m.py at CPU size: the tiny model (T=256) with DeepSeek Sparse Attention in every
layer, scaled to its length: 4 indexer heads of 32 channels (16 with RoPE), 64 keys per token, dense
up to 64 tokens. Two phases, as the paper trains: the indexer's dense warm-up (only the indexer
trains, from the KL to the layer's attention) for 100 steps, then sparse training of everything
(the indexer from its KL over the selected keys, the model from the LM loss). Start from a dense run:

    python train.py                                                      # runs/tiny
    python train.py --config configs/dsa_tiny.py --init_from runs/tiny
"""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.config import OptimizerConfig, PhaseConfig, TrainerConfig
from sparsetrain.sparse.dsa import DsaOptions

WARMUP_STEPS = 100


def get_config():
    base = tiny()
    rule = DsaOptions(block_size=16, mode="warmup", index_heads=4, index_dim=32, index_rope_dim=16, topk=64,
                      dense_len=64, query_chunk=128)
    return dataclasses.replace(
        base, name="dsa_tiny",
        model=dataclasses.replace(base.model, attention=(rule,)),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0),
        trainer=TrainerConfig(steps=200, eval_every=100, eval_batches=4, log_every=10, phases=(
            PhaseConfig(start_step=WARMUP_STEPS, overrides=("model.attention.0.mode=sparse",)),)))
