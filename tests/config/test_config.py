import json

import pytest

import configs
from sparsetrain.attention.spec import AttentionSpec, parse_layers, spec_for_layer
from sparsetrain.config import ModelConfig, RunConfig
from sparsetrain.configbase import ConfigError, apply_overrides, describe, from_dict, to_dict


def test_every_shipped_config_loads():
    assert {"tiny", "small_125m"} <= set(configs.available())
    for name in configs.available():
        assert isinstance(configs.load(name), RunConfig)


def test_overrides_set_nested_fields_with_types():
    cfg = apply_overrides(configs.load("tiny"), [
        "model.num_layers=6", "optimizer.learning_rate=1e-4", "model.tie_embeddings=true",
        "optimizer.freeze=embed,layers/0", "model.attention.0.impl=xla", "checkpoint.init_from=/x"])
    assert cfg.model.num_layers == 6 and cfg.optimizer.learning_rate == 1e-4
    assert cfg.model.tie_embeddings is True and cfg.optimizer.freeze == ("embed", "layers/0")
    assert cfg.model.attention[0].impl == "xla" and cfg.checkpoint.init_from == "/x"


@pytest.mark.parametrize("override,message", [
    ("model.nope=1", "unknown key 'model.nope'"),
    ("nope=1", "unknown key 'nope'"),
    ("model.num_layers=four", "model.num_layers='four' must be int"),
    ("model.tie_embeddings=maybe", "must be a bool"),
    ("model.remat=half", "choose one of 'none' | 'full' | 'dots'"),
    ("model.attention.0.method=magic", "choose one of"),
    ("model.attention.3.method=dense", "index must be in 0..0"),
    ("model.num_kv_heads=3", "must divide num_heads"),
    ("model=1", "is a group"),
    ("trainer.steps", "must look like key.sub=value"),
    ("data.seq_len=4096", "exceeds model.max_seq_len"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        apply_overrides(configs.load("tiny"), [override])


def test_layer_rules_last_match_wins():
    rules = (AttentionSpec(layers="all"), AttentionSpec(layers="2:", impl="xla"))
    assert [spec_for_layer(rules, i, 4).impl for i in range(4)] == ["auto", "auto", "xla", "xla"]
    assert parse_layers("0,1", 4) == {0, 1} and parse_layers(":2", 4) == {0, 1}
    assert parse_layers("-1", 4) == {3}
    with pytest.raises(ConfigError, match="layers"):
        parse_layers("a-b", 4)
    with pytest.raises(ConfigError, match="cover"):
        ModelConfig(num_layers=4, attention=(AttentionSpec(layers="0,1"),))


def test_scan_needs_one_spec_for_all_layers():
    with pytest.raises(ConfigError, match="scan_layers"):
        ModelConfig(num_layers=4, scan_layers=True,
                    attention=(AttentionSpec(), AttentionSpec(layers="2:", impl="xla")))


def test_dict_round_trip_and_help():
    cfg = configs.load("small_125m")
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    lines = describe(cfg)
    assert any(line.strip().startswith("model.attention.0.method = 'dense'") for line in lines)


def test_block_size_must_be_a_kernel_tile():
    with pytest.raises(ConfigError, match="block_size=48: choose one of"):
        AttentionSpec(block_size=48)
