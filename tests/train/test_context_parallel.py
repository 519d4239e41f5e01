"""Context parallelism (mesh.context): the load-balanced layout, and the same loss and gradients as
one device on 8 fake CPU devices, for dense and local layers."""

import json

import numpy as np
import pytest

from sparsetrain.attention.context_parallel import chunk_length, load_balanced_order
from sparsetrain.configbase import ConfigError
from tests.fake_devices import run_script
from tests.train.helpers import SMALL, small_config


def test_each_device_holds_one_early_and_one_late_chunk():
    order = load_balanced_order(16, 2)  # 4 chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    with pytest.raises(ValueError, match="data.seq_len=18 must be a multiple of 4"):
        chunk_length(18, 2)


def test_meshes_with_a_context_axis_match_one_device(tmp_path):
    out = run_script("tests/train/context_parallel_script.py", tmp_path)
    errors = json.loads(out.split("RESULT ", 1)[1])
    for case, meshes in errors.items():   # dense, local (reference, Triton), with and without documents
        assert set(meshes) == ({"context4_data2", "context2_data2_fsdp2"} if case.endswith("documents")
                               else {"context4_data2"})
        for mesh, (loss_err, grad_err) in meshes.items():
            assert loss_err < 1e-5 and grad_err < 1e-5, (case, mesh, loss_err, grad_err)


def test_context_axis_refuses_methods_that_select_from_content(tmp_path):
    with pytest.raises(ConfigError, match="supports dense and local attention layers"):
        small_config(tmp_path, "mesh.context=2", "model.attention.0.method=moba")


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
