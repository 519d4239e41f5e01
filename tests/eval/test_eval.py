"""The evaluation command on a tiny random checkpoint, and its probes and scorers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sparsetrain.config import PhaseConfig
from sparsetrain.data import ByteTokenizer
from sparsetrain.eval.__main__ import main
from sparsetrain.eval.measure import Runner, load_subject
from sparsetrain.eval.probes import PASSKEY_INTRO, PASSKEY_QUESTION, answers_correct, mqar, passkey
from sparsetrain.eval.suite import _predict, powers_of_two
from tests.export.helpers import LOCAL_REST, random_params, save_run, tiny

TOK = ByteTokenizer()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_passkey_is_deterministic_and_its_needle_sits_at_the_depth():
    a, b = passkey(TOK, 600, 0.5, seed=3), passkey(TOK, 600, 0.5, seed=3)
    assert np.array_equal(a.tokens, b.tokens) and a.info == b.info
    assert passkey(TOK, 600, 0.5, seed=4).info["key"] != a.info["key"]
    assert len(a.tokens) == 600 and a.tokens.dtype == np.int32
    key = a.info["key"]
    start, end = a.answers[0]
    assert (start, end) == (600 - len(key), 600) and TOK.decode(a.tokens[start:end]) == key
    assert TOK.decode(a.tokens[a.info["needle_start"]:]).startswith(f"The pass key is {key}.")
    assert TOK.decode(a.tokens[:start]).endswith(PASSKEY_QUESTION)
    first, last = passkey(TOK, 600, 0.0, seed=3), passkey(TOK, 600, 1.0, seed=3)
    assert first.info["needle_start"] == len(PASSKEY_INTRO)
    needle_end = TOK.decode(last.tokens).index("is the pass key.\n") + len("is the pass key.\n")
    assert TOK.decode(last.tokens)[needle_end:].startswith(PASSKEY_QUESTION)
    middle = (a.info["needle_start"] - len(PASSKEY_INTRO)) / (600 - 250)
    assert abs(middle - 0.5) < 0.2


def test_mqar_is_deterministic_and_its_answers_are_the_values():
    probe = mqar(TOK, 12, seed=1)
    assert np.array_equal(probe.tokens, mqar(TOK, 12, seed=1).tokens)
    assert not np.array_equal(probe.tokens, mqar(TOK, 12, seed=2).tokens)
    text = TOK.decode(probe.tokens)
    facts = dict(pair.split("=") for pair in text.split("\n")[1].split("; "))
    assert len(facts) == 12 and len(probe.answers) == 12
    for start, end in probe.answers:
        key = TOK.decode(probe.tokens[start - 4:start - 1])
        assert TOK.decode(probe.tokens[start:end]) == facts[key]


class Oracle:
    """A model that predicts every next token: greedy decoding of it emits each answer."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def __call__(self, tokens):
        predicted = np.roll(tokens, -1, axis=1)
        return None, (predicted + 1) % TOK.vocab_size if self.wrong else predicted, {}


def test_scorers_are_exact():
    probes = [passkey(TOK, 400, d, seed=0) for d in (0.0, 1.0)] + [mqar(TOK, 5, seed=0)]
    assert all(all(row) for row in _predict(Oracle(), probes))
    assert not any(any(row) for row in _predict(Oracle(wrong=True), probes))
    probe = probes[0]
    start, end = probe.answers[0]
    predicted = np.roll(probe.tokens, -1)
    predicted[end - 2] = (predicted[end - 2] + 1) % 10   # only the last digit wrong
    assert answers_correct(probe, predicted) == [False]


def test_lengths_are_powers_of_two():
    assert powers_of_two(1024, 8192) == (1024, 2048, 4096, 8192)
    assert powers_of_two(1000, 5000) == (1000, 2000, 4000)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    cfg = tiny(attention=LOCAL_REST)
    return save_run(tmp_path_factory.mktemp("eval"), cfg, random_params(cfg))


def test_dense_mode_runs_the_same_weights_with_every_layer_dense(sparse_run, tmp_path):
    subject = load_subject(sparse_run)
    dense = Runner(subject, "dense")
    assert [s.method for s in dense.model_def.cfg.layer_specs] == ["dense"] * 3
    cfg = tiny()
    dense_run = save_run(tmp_path, cfg, dense.model_def.params_from_flat(
        {k: v for k, v in subject.flat.items()}))
    tokens = np.random.default_rng(0).integers(0, 256, (1, 200)).astype(np.int32)
    np.testing.assert_allclose(dense(tokens)[0], Runner(load_subject(dense_run), "sparse")(tokens)[0], rtol=1e-5)
    sparse = Runner(subject, "sparse")
    sparse_nll, predicted, metrics = sparse(tokens)
    logits = sparse.model_def.apply(sparse.params, tokens)[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(sparse_nll[0], -logp[np.arange(199), tokens[0, 1:]], rtol=1e-4)
    assert np.array_equal(predicted[0], np.asarray(logits).argmax(-1))
    assert set(metrics) >= {"density/1", "density/2", "recall/1"} and "density/0" not in metrics
    assert not np.allclose(sparse_nll, dense(tokens)[0])


def test_a_checkpoint_is_evaluated_in_the_phase_it_was_saved_in(tmp_path):
    """A run that switched how a layer attends (e.g. SeerAttention from distill to sparse) is evaluated
    as it attends at the checkpoint's step, not as its first phase did."""
    cfg = tiny(attention=LOCAL_REST)
    switched = (PhaseConfig(start_step=5, overrides=("model.attention.1.local_blocks=1",)),)
    early = load_subject(save_run(tmp_path / "early", cfg, random_params(cfg), step=4, phases=switched))
    late = load_subject(save_run(tmp_path / "late", cfg, random_params(cfg), step=5, phases=switched))
    assert early.cfg.model.attention[1].local_blocks == 2
    assert late.cfg.model.attention[1].local_blocks == 1


def test_command_writes_json_markdown_and_plots_that_agree(sparse_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sparse_run), "--out", str(out), "--min_len", "256", "--max_len", "512",
                 "--loss_tokens", "1024", "--depths", "0,1", "--passkey_samples", "2", "--mqar_pairs", "4",
                 "--mqar_samples", "2", "--no_progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert set(results["loss"]) == {"sparse", "dense"} and set(results["loss"]["dense"]) == {"256", "512"}
    for per_length in results["loss"].values():
        for value in per_length.values():
            assert f"{value['loss']:.4f} ({value['perplexity']:.2f})" in markdown
    assert set(results["layers"]["512"]["density"]) == {"1", "2"}
    assert f"| 1 | {results['layers']['512']['density']['1']:.3f} |" in markdown
    assert set(results["passkey"]["sparse"]["512"]) == {"0.0", "1.0"}
    assert results["mqar"]["dense"]["4"]["length"] > 0
    view = results["selection_map"]
    assert (view["layer"], view["length"]) == (1, 512) and f"hold {view['covered']:.1%}" in markdown
    blocks = np.load(out / "selection_map.npz")
    assert blocks["selected"].shape == blocks["scores"].shape == (16, 16)
    assert view["covered"] == pytest.approx((blocks["scores"] * blocks["selected"]).sum() / blocks["scores"].sum())
    for name in ("loss_vs_length.png", "passkey.png", "layers.png", "selected_blocks.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "sparse  loss@512" in capsys.readouterr().out


def test_dense_flag_and_bad_inputs(sparse_run, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main([str(sparse_run), "--out", str(out), "--modes", "dense", "--tasks", "loss", "--min_len", "256",
                 "--max_len", "256", "--loss_tokens", "256", "--no_progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["loss"]) == ["dense"] and results["layers"] == {} and results["passkey"] == {}
    for argv, message in [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(sparse_run), "--modes", "fast", "--max_len", "256"], "--modes fast: choose from sparse,dense"),
        ([str(sparse_run), "--min_len", "1024", "--max_len", "512"], "need 2 <= min_len <= max_len"),
    ]:
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / "x"), "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_overrides_evaluate_the_weights_under_another_model_config(sparse_run, tmp_path, capsys):
    options = ["--modes", "dense", "--tasks", "loss", "--min_len", "256", "--max_len", "256",
               "--loss_tokens", "256", "--no_progress"]
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    assert main([str(sparse_run), "--out", str(plain), *options]) == 0
    assert main([str(sparse_run), "model.rope.scaling=linear", "model.rope.factor=2", "--out", str(scaled),
                 *options]) == 0
    before, after = (json.loads((d / "results.json").read_text()) for d in (plain, scaled))
    assert (before["rope"]["scaling"], after["rope"]["scaling"], after["rope"]["factor"]) == ("none", "linear", 2)
    assert after["overrides"] == ["model.rope.scaling=linear", "model.rope.factor=2"] and before["overrides"] == []
    assert "Evaluated with: model.rope.scaling=linear model.rope.factor=2" in (scaled / "results.md").read_text()
    assert after["loss"]["dense"]["256"]["loss"] != before["loss"]["dense"]["256"]["loss"]
    for override, message in [
        ("data.seq_len=64", "'data.seq_len=64': evaluation overrides change the model only"),
        ("model.attention.0.method=seer", "the checkpoint's weights do not fit the model after"),
        ("model.rope.scaling=sideways", "model.rope.scaling"),
    ]:
        capsys.readouterr()
        assert main([str(sparse_run), override, "--out", str(tmp_path / "x"), *options]) == 2
        err = capsys.readouterr().err
        assert message in err, err
