import dataclasses
import json

import pytest

import configs
from sparsetrain.attention.spec import DenseOptions, method_options, parse_layers, spec_for_layer
from sparsetrain.config import ModelConfig, RunConfig
from sparsetrain.config_help import describe
from sparsetrain.configbase import ConfigError, apply_overrides, from_dict, to_dict


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
    rules = (DenseOptions(layers="all"), DenseOptions(layers="2:", impl="xla"))
    assert [spec_for_layer(rules, i, 4).impl for i in range(4)] == ["auto", "auto", "xla", "xla"]
    assert parse_layers("0,1", 4) == {0, 1} and parse_layers(":2", 4) == {0, 1}
    assert parse_layers("-1", 4) == {3}
    with pytest.raises(ConfigError, match="layers"):
        parse_layers("a-b", 4)
    with pytest.raises(ConfigError, match="cover"):
        ModelConfig(num_layers=4, attention=(DenseOptions(layers="0,1"),))


def test_scan_needs_one_spec_for_all_layers():
    with pytest.raises(ConfigError, match="scan_layers"):
        ModelConfig(num_layers=4, scan_layers=True,
                    attention=(DenseOptions(), DenseOptions(layers="2:", impl="xla")))


def test_dict_round_trip_and_help():
    cfg = configs.load("small_125m")
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    lines = describe(cfg)
    assert any(line.strip().startswith("model.attention.0.method = 'dense'") for line in lines)
    # Grouped by section, with each field's meaning from the comment beside it in the source.
    assert "model:" in lines and "optimizer:" in lines
    assert any(line.strip().startswith("data.batch_size = 16") and line.endswith("# global batch, in sequences")
               for line in lines)


def test_block_size_must_be_a_kernel_tile():
    with pytest.raises(ConfigError, match="block_size=48: choose one of"):
        method_options("local", block_size=48)


def test_configs_and_help_import_no_jax():
    code = ("import sys, runpy; sys.argv = ['train.py', '--help'];\n"
            "import configs\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'pallas_kernels'))\n"
            "print('HEAVY', heavy)")
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "model.attention.0.method" in out.stdout   # the help itself was printed


def test_switching_a_rule_to_another_method_from_the_command_line():
    tiny = configs.load("tiny")
    two_rules = dataclasses.replace(tiny, model=dataclasses.replace(
        tiny.model, attention=(DenseOptions(), DenseOptions(layers=":-1"))))
    cfg = apply_overrides(two_rules, ["model.attention.1.method=seer", "model.attention.1.topk=4"])
    rule = cfg.model.attention[1]
    assert (type(rule).__name__, rule.method, rule.topk, rule.layers, rule.mode) == (
        "SeerOptions", "seer", 4, ":-1", "distill")
    with pytest.raises(ConfigError, match=r"unknown key 'model.attention.1.local_blocs'; model.attention.1 "
                                          r"\(method 'seer'\) has: layers, method, impl, block_size"):
        apply_overrides(cfg, ["model.attention.1.local_blocs=2"])
    # Dense has no seer fields: switching back drops them.
    back = apply_overrides(cfg, ["model.attention.1.method=dense"])
    assert type(back.model.attention[1]).__name__ == "DenseOptions" and back.model.attention[1].layers == ":-1"
    with pytest.raises(ConfigError, match="topk"):
        apply_overrides(back, ["model.attention.1.topk=4"])
    with pytest.raises(ConfigError, match="is set by the rule's class"):
        dataclasses.replace(method_options("local"), method="seer")


def test_configs_saved_before_per_method_options_still_load():
    """Checkpoint metadata written by the flat AttentionSpec (every rule had every field)."""
    old = to_dict(configs.load("tiny"))
    old["model"]["attention"] = [
        {"layers": "all", "method": "dense", "impl": "auto", "block_size": 64, "local_blocks": 1,
         "initial_blocks": 0},
        {"layers": "2:", "method": "local", "impl": "xla", "block_size": 32, "local_blocks": 2,
         "initial_blocks": 1}]
    old["trainer"]["aux_loss_weights"] = []   # removed: weights now live on each method's options
    cfg = from_dict(RunConfig, json.loads(json.dumps(old)))
    dense, local = cfg.model.attention
    assert dense == DenseOptions()
    assert local == method_options("local", layers="2:", impl="xla", block_size=32, local_blocks=2,
                                   initial_blocks=1)


def test_export_does_not_import_the_trainer():
    import subprocess
    import sys
    code = ("import sys, sparsetrain.export.export, sparsetrain.export.import_hf, sparsetrain.export.pretrained\n"
            "print('TRAIN', sorted(m for m in sys.modules if m.startswith('sparsetrain.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TRAIN []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_override_order_does_not_matter_and_all_problems_are_reported_together():
    tiny = configs.load("tiny")
    a = apply_overrides(tiny, ["data.seq_len=1024", "model.max_seq_len=1024"])
    b = apply_overrides(tiny, ["model.max_seq_len=1024", "data.seq_len=1024"])
    assert a == b and a.data.seq_len == 1024
    with pytest.raises(ConfigError) as e:
        apply_overrides(tiny, ["model.num_layers=four", "optimizer.warmup_steps=-1", "data.seq_len=4096",
                               "model.nope=1"])
    lines = str(e.value).splitlines()
    assert len(lines) == 4, lines
    assert any(line.startswith("model.num_layers='four' must be int") for line in lines)
    assert "optimizer.warmup_steps=-1: must be >= 0" in lines
    assert "data: seq_len=4096 exceeds model.max_seq_len=256" in lines   # the field named once
    assert any(line.startswith("unknown key 'model.nope'") for line in lines)


def test_rules_are_added_and_removed_from_the_command_line():
    tiny = configs.load("tiny")
    two = apply_overrides(tiny, ['model.attention=[{layers: all, method: dense}, '
                                 '{layers: "1:-1", method: seer, topk: 4, block_size: 32}]'])
    dense, seer = two.model.attention
    assert (dense, seer.layers, seer.topk, seer.block_size) == (DenseOptions(), "1:-1", 4, 32)
    assert [s.method for s in two.model.layer_specs] == ["dense", "seer", "seer", "dense"]
    one = apply_overrides(two, ['model.attention=[{method: local, block_size: 16}]'])   # removed
    assert [s.method for s in one.model.layer_specs] == ["local"] * 4
    with pytest.raises(ConfigError, match=r"model.attention.1: unknown key\(s\) \['topkk'\]; SeerOptions "
                                          r"\(method 'seer'\) has: layers, method"):
        apply_overrides(tiny, ['model.attention=[{method: dense}, {layers: "1:", method: seer, topkk: 4}]'])
    with pytest.raises(ConfigError, match="model.attention.1.block_size=48: choose one of"):
        apply_overrides(tiny, ['model.attention=[{method: dense}, {layers: "1:", method: local, block_size: 48}]'])
    with pytest.raises(ConfigError, match="list of mappings"):
        apply_overrides(tiny, ["model.attention=dense"])


def test_configs_load_from_any_path_and_from_a_runs_config_json(tmp_path):
    source = tmp_path / "mine.py"
    source.write_text("import dataclasses\nfrom configs.tiny import get_config as tiny\n\n"
                      "def get_config():\n    return dataclasses.replace(tiny(), name='mine')\n")
    assert configs.load(str(source)).name == "mine"
    run_cfg = apply_overrides(configs.load("seer_tiny"), ["model.attention.0.topk=3", "trainer.steps=7"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(to_dict(run_cfg)))
    assert configs.load(str(saved)) == run_cfg    # reproduces the run exactly
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        configs.load("nope")
    with pytest.raises(ConfigError, match="no such file"):
        configs.load(str(tmp_path / "missing.json"))
