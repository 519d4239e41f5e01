"""Pretraining workflow with InfLLM-V2 in every layer, per-token selection: blocks of 64, MiniCPM4's
compressed keys (32/16 fine, 128/64 coarse), 24 blocks per query (1536 keys, as MoBA's three
routing blocks: the sink and a 512-token window included), dense below 2048 tokens: 34% of the
causal work by the density budget. Model, data, tokens and seed as configs/pretrain_dense.py.

    python train.py --config configs/pretrain_infllm_v2.py
"""

from configs._workflows import pretrain
from sparsetrain.sparse.infllm_v2 import InfllmV2Options


def get_config():
    return pretrain("pretrain_infllm_v2", (InfllmV2Options(topk=24, local_blocks=8, dense_len=2048),))
