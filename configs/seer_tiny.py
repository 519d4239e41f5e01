"""configs/seer_125m.py at CPU size: the tiny model with Seer gates (blocks of 16 at T=256),
distilled from a dense tiny run (`--init_from runs/tiny`) in a few minutes on 2 cores."""

import dataclasses

from configs.tiny import get_config as tiny
from sparsetrain.config import OptimizerConfig, TrainerConfig
from sparsetrain.sparse.seer import SeerOptions


def get_config():
    base = tiny()
    return dataclasses.replace(
        base, name="seer_tiny",
        model=dataclasses.replace(base.model, attention=(
            SeerOptions(block_size=16, mode="distill", select="density", target_density=0.25),)),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0),
        trainer=TrainerConfig(steps=200, eval_every=100, eval_batches=4, log_every=10))
