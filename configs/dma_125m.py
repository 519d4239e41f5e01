"""DMA for the 125M model at T=16384: the paper's window of 2048 keys per query, as 32 key blocks of
64 (its own block included) chosen by the learned key bias, which is also added to the logits
(sparsetrain/sparse/dma.py). A (the bias scale) starts at 0, so the bias starts off and the first
steps keep the lowest blocks (ties); continue a dense run, as for InfLLM-V2:

    python train.py --config configs/dma_125m.py --init_from runs/small_125m
    python train.py --config configs/dma_125m.py model.attention.0.window=1024   # sparser
"""

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.sparse.dma import DmaOptions

SEQ = 16384


def get_config():
    cfg = small_125m()
    model = dataclasses.replace(cfg.model, max_seq_len=SEQ, attention=(DmaOptions(),))
    data = dataclasses.replace(cfg.data, seq_len=SEQ, batch_size=4)
    return dataclasses.replace(cfg, name="dma_125m", model=model, data=data)
