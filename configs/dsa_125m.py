"""DeepSeek Sparse Attention on the 125M model at T=16384, in every layer: the lightning indexer
(4 heads of 64 channels, 32 with RoPE; the paper's 64 x 128 is `model.attention.0.index_heads=64
model.attention.0.index_dim=128 model.attention.0.index_rope_dim=64`) keeps the paper's 2048 keys
per token, and sequences of at most 2048 tokens run dense. Two phases, as the paper: the indexer's
dense warm-up (only the indexer trains, from the KL to the layer's attention; the paper ran 1000
steps at lr 1e-3), then sparse training of everything. Start from a dense run at this length:

    python train.py --config configs/dsa_125m.py --init_from runs/<dense run>

32k: `data.seq_len=32768 model.max_seq_len=32768 data.batch_size=2`. The trainer keeps one learning
rate schedule for both phases (the paper drops to 7.3e-6 for sparse training).
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.config import PhaseConfig
from sparsetrain.sparse.dsa import DsaOptions

SEQ = 16384
WARMUP_STEPS = 200


def get_config():
    cfg = small_125m()
    model = dataclasses.replace(cfg.model, max_seq_len=SEQ, attention=(DsaOptions(mode="warmup"),))
    data = dataclasses.replace(cfg.data, seq_len=SEQ, batch_size=4)
    trainer = dataclasses.replace(cfg.trainer, steps=1000, phases=(
        PhaseConfig(start_step=WARMUP_STEPS, overrides=("model.attention.0.mode=sparse",)),))
    return dataclasses.replace(cfg, name="dsa_125m", model=model, data=data, trainer=trainer)
