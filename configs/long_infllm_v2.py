"""Short-to-long workflow (b), InfLLM-V2's recipe: runs/pretrain_short_dense with RoPE extended 8x by
YaRN, trained on sparse through the curriculum 2048 -> 8192 -> 16384 (tokens and steps as
configs/long_dense.py). Every layer is InfLLM-V2 with per-token selection, dense below the
pretraining length (so the 2048 phase is exactly the dense model), above it 16 blocks of 64 per
query (the sink and a 256-token window included): 12.5% of the causal work at 16384. No new
parameters; `model.attention.0.ssa=true` adds SSA's alignment of the sparse and full outputs.

    python train.py --config configs/long_infllm_v2.py
    python train.py --config configs/long_infllm_v2.py name=long_infllm_v2_ssa model.attention.0.ssa=true
"""

from configs._workflows import SHORT, long_context
from sparsetrain.sparse.infllm_v2 import InfllmV2Options


def get_config():
    return long_context("long_infllm_v2", (InfllmV2Options(topk=16, local_blocks=4, dense_len=SHORT),))
