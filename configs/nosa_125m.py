"""NOSA for the 125M model at T=16384, NOSA's settings: blocks of 64, compressed keys over 32 tokens
(stride 16) and 128 (stride 64), 64 blocks per query tile: the sink block, a 1024-token window and
16 blocks by InfLLM-V2's query scores (query-aware), the other 31 by the learned eviction score
(query-agnostic), which is also the logits' key bias (sparsetrain/sparse/nosa.py). Selected per
query tile. Continue a dense run, as for InfLLM-V2:

    python train.py --config configs/nosa_125m.py --init_from runs/small_125m
    python train.py --config configs/nosa_125m.py model.attention.0.query_topk=32   # more query-aware
"""

from configs._method_125m import method_125m
from sparsetrain.sparse.nosa import NosaOptions


def get_config():
    return method_125m("nosa_125m", NosaOptions())
