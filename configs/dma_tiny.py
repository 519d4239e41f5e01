"""configs/dma_125m.py at CPU size: the tiny model (T=256) with DMA scaled to its length: blocks of
16 and a window of 64 keys (4 blocks a query, its own included), so a run is sparse from the
second half of the sequence on. The key-score parameters (A at 0, W_delta) train with the model:
from scratch, or continuing a dense run with `--init_from runs/tiny`."""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.sparse.dma import DmaOptions


def get_config():
    base = tiny()
    rule = DmaOptions(block_size=16, window=64)
    return dataclasses.replace(base, name="dma_tiny", model=dataclasses.replace(base.model, attention=(rule,)))
