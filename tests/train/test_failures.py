"""What a user can rely on when something goes wrong on resume: a corrupt latest checkpoint is moved
aside and the run resumes from the newest good one (or stops with checkpoint.on_corrupt=fail), metric
rows of steps trained again appear once, and a changed config never resumes silently.

One trained run (checkpoints at steps 2 and 4) serves every case; each case works on its own copy."""

import json
import random
import shutil

import pytest

from sparsetrain.errors import InputError
from sparsetrain.train import Trainer
from tests.train.helpers import read_metrics, small_config

RUN = ("trainer.steps=4", "checkpoint.every=2", "trainer.eval_every=1000", "checkpoint.async_save=false")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    Trainer(small_config(root, *RUN, "name=base")).run()
    return root / "base"


@pytest.fixture
def run_copy(trained, tmp_path):
    """(a copy of the trained run directory, its config overridden by extra arguments)."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run", lambda *overrides: small_config(tmp_path, *RUN, "name=run", *overrides)


def _largest_array_file(step_dir):
    return max((step_dir / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_array_file(step_dir)
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return "params"


def _overwrite(step_dir):
    # Orbax itself reads these bytes back without complaint; only the checksums notice.
    f = _largest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    rng = random.Random(0)
    start = len(data) // 3
    data[start:start + 256] = bytes(rng.randrange(256) for _ in range(256))
    f.write_bytes(bytes(data))
    return "params"


def _garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{garbage")
    return "meta"


def _garbage_data_position(step_dir):
    next((step_dir / "data").glob("process_0*.json")).write_text("not json")
    return "data"


CORRUPTIONS = [_truncate, _overwrite, _garbage_meta, _garbage_data_position]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(run_copy, corrupt, capsys):
    run_dir, config = run_copy
    item = corrupt(run_dir / "checkpoints" / "4")
    trainer = Trainer(config())
    assert int(trainer.state["step"]) == 2
    out = capsys.readouterr()
    assert f"checkpoint step 4 is corrupt: {run_dir.absolute() / 'checkpoints' / '4' / item}" in out.out + out.err
    assert (run_dir / "checkpoints" / "4.corrupt" / item).is_dir()   # kept, not deleted
    assert trainer.checkpointer.all_steps() == [2]


def test_on_corrupt_fail_stops_with_one_line_naming_step_and_file(run_copy):
    run_dir, config = run_copy
    _garbage_meta(run_dir / "checkpoints" / "4")
    with pytest.raises(InputError, match=r"checkpoint step 4 is corrupt: .*4/meta: .*on_corrupt=fail") as e:
        Trainer(config("checkpoint.on_corrupt=fail"))
    assert "\n" not in str(e.value)
    assert (run_dir / "checkpoints" / "4").is_dir()


def test_steps_trained_again_after_a_fallback_are_logged_once(run_copy):
    run_dir, config = run_copy
    _overwrite(run_dir / "checkpoints" / "4")
    Trainer(config()).run()
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4]


def test_a_changed_model_shape_is_an_error_naming_the_field(run_copy):
    _, config = run_copy
    with pytest.raises(InputError, match="other parameter shapes.*model.mlp_dim: 128 -> 256"):
        Trainer(config("model.mlp_dim=256"), allow_config_change=True)


def test_other_changes_need_allow_config_change_and_are_kept_per_segment(run_copy, capsys):
    run_dir, config = run_copy
    saved = (run_dir / "config.json").read_text()
    changed = config("optimizer.learning_rate=0.001", "data.batch_size=4")
    with pytest.raises(InputError, match=r"optimizer.learning_rate: 0.003 -> 0.001.*--allow_config_change"):
        Trainer(changed)
    Trainer(changed, allow_config_change=True).run()   # at its last step: nothing to train
    assert (run_dir / "config.json").read_text() == saved
    assert json.loads((run_dir / "config.4.json").read_text())["optimizer"]["learning_rate"] == 0.001
    assert "resumed at step 4 with config changes (data.batch_size: 8 -> 4; " in capsys.readouterr().out


def test_training_longer_needs_no_flag(run_copy):
    run_dir, config = run_copy
    Trainer(config("trainer.steps=6", "checkpoint.every=0")).run()
    assert json.loads((run_dir / "config.4.json").read_text())["trainer"]["steps"] == 6
