"""RunConfig.at_step: the config a checkpoint's weights were trained under (evaluation loads it)."""

import dataclasses

from configs.long_tiny_seer import get_config as seer_config
from sparsetrain.config import PhaseConfig


def test_at_step_applies_the_phases_started_by_then_in_order():
    cfg = seer_config()   # distills the gates, then runs sparse from its phase's start step on
    switch = cfg.trainer.phases[0].start_step
    assert cfg.model.attention[0].mode == "distill"
    assert cfg.at_step(switch - 1).model.attention[0].mode == "distill"
    assert cfg.at_step(switch).model.attention[0].mode == "sparse"
    assert cfg.at_step(10 * switch) == cfg.at_step(switch)

    later = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, phases=(
        *cfg.trainer.phases, PhaseConfig(start_step=switch + 5, overrides=("data.batch_size=2",)))))
    assert later.at_step(switch + 4).data.batch_size == cfg.data.batch_size
    stepped = later.at_step(switch + 5)
    assert (stepped.data.batch_size, stepped.model.attention[0].mode) == (2, "sparse")
