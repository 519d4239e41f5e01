import json

import numpy as np
import pytest

from sparsetrain.partitioning import LOGICAL_RULES, logical_to_spec
from sparsetrain.train.sharding import mesh_shape
from sparsetrain.config import MeshConfig
from tests.fake_devices import run_script
from tests.shared import once_per_session

@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    def run(root):
        stdout = run_script("tests/train/multi_device_script.py", root, timeout=900)
        line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])
    return once_per_session(tmp_path_factory, "eight_devices", run)   # one script run for all workers


def test_losses_match_single_device_on_every_mesh(eight_device_results):
    losses = eight_device_results["losses"]
    for name in ("8x1x1", "2x4x1", "2x2x2"):
        assert len(losses[name]) == 3
        np.testing.assert_allclose(losses[name], losses["1dev"], rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(losses["2x2x2_local"], losses["1dev_local"], rtol=2e-5)
    assert not np.allclose(losses["1dev_local"], losses["1dev"])  # the sparse layers did change the model


def test_parameters_are_sharded_as_the_rules_say(eight_device_results):
    specs = eight_device_results["specs"]
    # q_proj [embed, heads, head_dim]: embed -> fsdp, heads -> tensor.
    assert specs["2x2x2"]["layers/0/attn/q_proj"] == ["fsdp", "tensor", None]
    assert specs["2x2x2"]["layers/0/attn/k_proj"] == ["fsdp", "tensor", None]
    assert specs["2x4x1"]["layers/0/mlp/down_proj"] == [None, "fsdp"]
    assert specs["2x2x2"]["lm_head"] == ["fsdp", "tensor"]
    assert specs["2x2x2"]["layers/1/input_norm/scale"] == [None]
    # Adam moments are sharded like their parameter.
    assert eight_device_results["opt_specs_2x2x2"]["layers/0/attn/q_proj"] == ["fsdp", "tensor", None]
    # Pure data parallel replicates every parameter.
    assert all(set(spec) == {None} for spec in specs["8x1x1"].values())


def test_restore_onto_other_meshes(eight_device_results):
    assert eight_device_results["restored_equal"] == {"8x1x1": True, "1dev": True}
    assert eight_device_results["restored_step"] == 3
    for spec in eight_device_results["specs"]["restored_on_8x1x1"].values():
        assert set(spec) == {None}


def test_mesh_shape_resolves_and_rejects():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1, 1)
    assert mesh_shape(MeshConfig(data=2, context=2, tensor=2), 8) == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_indivisible_dims_stay_replicated():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 8}
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 4, 16), FakeMesh()) == \
        logical_to_spec(("embed", None, None), (64, 4, 16), FakeMesh())
    assert set(LOGICAL_RULES) >= {"embed", "heads", "kv_heads", "mlp", "vocab", "layers", "norm"}


def test_optimizer_moments_follow_their_parameters():
    import jax
    from sparsetrain.train.loop import state_shardings
    from sparsetrain.checkpoint.model_def import ModelDef
    from sparsetrain.train.optimizer import make_optimizer
    from sparsetrain.train.sharding import make_mesh, param_shardings
    from tests.train.helpers import small_config

    cfg = small_config("/tmp", "optimizer.freeze=^embed", "optimizer.lr_multipliers=lm_head=0.5")
    model = ModelDef.create(cfg.model)
    abstract = model.abstract_params()
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    p_shard = param_shardings(model.logical_axes(), abstract, mesh)
    opt = make_optimizer(cfg.optimizer, abstract, 10)
    shardings = state_shardings(jax.eval_shape(opt.init, abstract), p_shard, abstract, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0]
    moments = [s for path, s in leaves if "mu" in str(path) and "q_proj" in str(path)]
    assert len(moments) == 2 and all(s == p_shard["layers"][0]["attn"]["q_proj"] for s in moments)
    counts = [s for path, s in leaves if "count" in str(path)]
    assert counts and all(s.spec == jax.sharding.PartitionSpec() for s in counts)
