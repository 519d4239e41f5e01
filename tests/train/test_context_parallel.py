"""Context parallelism (mesh.context): the load-balanced layout, and the same loss and gradients as
one device on 8 fake CPU devices: dense and local layers, every sparse method over both K/V
exchanges, and a run resumed on other context sizes."""

import json
import re

import numpy as np
import pytest

from sparsetrain.attention.context_parallel import chunk_length, load_balanced_order
from sparsetrain.attention.spec import METHODS, options_class
from sparsetrain.configbase import ConfigError
from tests.fake_devices import run_script
from tests.train import context_parallel_methods_script as methods_script
from tests.train.helpers import SMALL, small_config

# Relative float32 tolerance against one device: the kernel splits each softmax row by chunk and
# device, and a method's dense branch runs the block-sparse kernel instead of XLA's attention; Seer's
# KL and recall, from block scores, differ most (6e-5 measured).
TOLERANCE = 2e-4


def test_each_device_holds_one_early_and_one_late_chunk():
    order = load_balanced_order(16, 2)  # 4 chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    with pytest.raises(ValueError, match="data.seq_len=18 must be a multiple of 4"):
        chunk_length(18, 2)


def test_meshes_with_a_context_axis_match_one_device(tmp_path):
    out = run_script("tests/train/context_parallel_script.py", tmp_path)
    errors = json.loads(out.split("RESULT ", 1)[1])
    assert set(errors) == {"local_pallas_documents"}
    for case, meshes in errors.items():
        assert set(meshes) == {"context4_data2", "context2_data2_fsdp2"}
        for mesh, (loss_err, grad_err) in meshes.items():
            assert loss_err < 1e-5 and grad_err < 1e-5, (case, mesh, loss_err, grad_err)


def methods_of(case: str) -> set[str]:
    return {m for rule in methods_script.CASES[case] for m in re.findall(r"method: (\w+)", rule)}


def test_every_method_that_runs_on_a_context_split_is_checked():
    # A method joins context parallelism by naming its exchanges; the equality test must then cover it
    # over each of them, in at least one case run on a mesh of that exchange.
    for exchange in ("all_gather", "ring"):
        claimed = {name for name in METHODS if exchange in options_class(name).context_parallel}
        checked = set().union(*(methods_of(case) for _, mesh_exchange, cases in methods_script.MESHES.values()
                                if mesh_exchange == exchange for case in cases))
        assert claimed <= checked, (exchange, claimed - checked)
    # ... and a case runs only on exchanges all its methods name (config validation refuses others).
    for _, exchange, cases in methods_script.MESHES.values():
        for case in cases:
            assert all(exchange in options_class(m).context_parallel for m in methods_of(case)), (case, exchange)


@pytest.mark.slow   # 240 s on 2 shared CPU cores: 3 models, 10 compiles (4 on one device, 6 on 8)
def test_every_method_matches_one_device_on_context_2_and_4_and_the_ring(tmp_path):
    errors = json.loads(run_script("tests/train/context_parallel_methods_script.py", tmp_path,
                                   timeout=1500).split("RESULT ", 1)[1])
    assert set(errors) == ({f"{case}_documents" for case in methods_script.CASES} | set(methods_script.PLAIN_CASES))
    for case, meshes in errors.items():
        if case.endswith("_documents"):
            assert set(meshes) == set(methods_script.document_meshes(case[:-len("_documents")])), case
        else:
            assert set(meshes) == {"context4_data2"}, case
        for mesh, errs in meshes.items():
            assert max(errs) < TOLERANCE, (case, mesh, errs)


@pytest.mark.slow   # 75 s on 2 shared CPU cores: 5 short runs on 3 meshes (one-device programs cached)
def test_resume_on_other_context_sizes_continues_the_same_run(tmp_path):
    out = json.loads(run_script("tests/train/context_parallel_resume_script.py", tmp_path).split("RESULT ", 1)[1])
    assert list(out["split"]) == list(out["straight"]) == ["1", "2", "3", "4"]   # same steps, same data
    np.testing.assert_allclose([out["split"][s] for s in out["split"]],
                               [out["straight"][s] for s in out["straight"]], rtol=1e-5)
    assert out["params_err"] < TOLERANCE


def test_context_axis_refuses_methods_that_do_not_support_it(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="kv_exchange='ring' is not supported by method 'nsa'"):
        small_config(tmp_path, "data.seq_len=128", "model.max_seq_len=128", "mesh.context=2",
                     "mesh.kv_exchange=ring", "model.attention.0.method=nsa", "model.attention.0.block_size=16")
    # A method that names no exchange (one registered but not yet checked here) is refused by name.
    monkeypatch.setattr(options_class("moba"), "context_parallel", ())
    with pytest.raises(ConfigError, match="not supported by method 'moba'.*runs under no context split"):
        small_config(tmp_path, "data.seq_len=128", "model.max_seq_len=128", "mesh.context=2",
                     "model.attention.0.method=moba", "model.attention.0.block_size=16")
    with pytest.raises(ConfigError, match="kv_exchange"):
        small_config(tmp_path, "mesh.kv_exchange=ppermute")
    with pytest.raises(ConfigError, match="context=2 does not support skip_threshold"):
        small_config(tmp_path, "data.seq_len=128", "model.max_seq_len=128", "mesh.context=2",
                     "model.attention.0.method=dense", "model.attention.0.skip_threshold=0.01")


def test_context_axis_needs_whole_tiles_per_chunk(tmp_path):
    with pytest.raises(ConfigError, match="seq_len=64 must be a multiple of 2 x mesh.context x 16 = 128"):
        small_config(tmp_path, "mesh.context=4")


def test_trains_from_the_cli(tmp_path):
    # local layers: evaluation also measures their recall (block scores back in natural order).
    run_script("train.py", "--config", "tiny", *SMALL, f"run_dir={tmp_path}", "name=cp", "mesh.context=2",
               "trainer.steps=2", "trainer.eval_every=2", "checkpoint.async_save=false",
               "model.attention.0.method=local", "model.attention.0.block_size=16")
    lines = [json.loads(line) for line in (tmp_path / "cp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line][-1] == 2
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    assert any("recall" in key for line in lines for key in line)
