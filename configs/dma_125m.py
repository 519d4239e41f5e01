"""DMA for the 125M model at T=16384: the paper's window of 2048 keys per query, as 32 key blocks of
64 (its own block included) chosen by the learned key bias, which is also added to the logits
(sparsetrain/sparse/dma.py). A (the bias scale) starts at 0, so the bias starts off and the first
steps keep the lowest blocks (ties); continue a dense run, as for InfLLM-V2:

    python train.py --config configs/dma_125m.py --init_from runs/small_125m
    python train.py --config configs/dma_125m.py model.attention.0.window=1024   # sparser
"""

from configs._method_125m import method_125m
from sparsetrain.sparse.dma import DmaOptions


def get_config():
    return method_125m("dma_125m", DmaOptions())
