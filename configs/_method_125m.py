"""The 125M model (configs/small_125m.py) at a long length with every layer under one attention
rule: what the per-method `*_125m.py` configs share. (Modules named _x are listed as no config.)"""

from __future__ import annotations

import dataclasses

from configs.small_125m import get_config as small_125m
from sparsetrain.attention.spec import MethodOptions
from sparsetrain.config import RunConfig


def method_125m(name: str, rule: MethodOptions, seq: int = 16384) -> RunConfig:
    """small_125m with `rule` on every layer at `seq` tokens, batch 4."""
    cfg = small_125m()
    model = dataclasses.replace(cfg.model, max_seq_len=seq, attention=(rule,))
    data = dataclasses.replace(cfg.data, seq_len=seq, batch_size=4)
    return dataclasses.replace(cfg, name=name, model=model, data=data)
