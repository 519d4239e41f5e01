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
from sparsetrain.data.retrieval_tasks import DEPTH_TASKS, EVAL, PASSKEY_INTRO, PASSKEY_QUESTION, Haystack, generate
from sparsetrain.eval.probes import score_answers
from sparsetrain.eval.suite import RETRIEVAL, _forward_probes, powers_of_two
from tests.export.helpers import LOCAL_REST, random_params, save_run, tiny

TOK = ByteTokenizer()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAY = Haystack(TOK, EVAL)


def probe(task, length=600, depth=None, seed=0, size=None):
    return generate(task, TOK, length, EVAL.rng(seed), EVAL, HAY, depth=depth,
                    size=size if size or task != "mqar" else 5)


def test_passkey_needle_starts_exactly_at_its_token_depth():
    a = probe("passkey", depth=0.5, seed=3)
    assert np.array_equal(a.tokens, probe("passkey", depth=0.5, seed=3).tokens)
    assert len(a.tokens) == 600 and a.tokens.dtype == np.int32
    key = a.info["key"]
    start, end = a.answers[0]
    assert (start, end) == (600 - len(key), 600) and TOK.decode(a.tokens[start:end]) == key
    assert TOK.decode(a.tokens[:start]).endswith(PASSKEY_QUESTION)
    needle = len(TOK.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n"))
    budget = 600 - len(PASSKEY_INTRO) - needle - len(PASSKEY_QUESTION) - len(key)
    for depth in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):   # every depth a distinct token, even at 600
        p = probe("passkey", depth=depth, seed=3)
        assert p.info["needle_starts"] == [len(PASSKEY_INTRO) + round(depth * budget)]
        assert TOK.decode(p.tokens[p.info["needle_starts"][0]:]).startswith(f"The pass key is {key}.")


class Oracle:
    """A model that predicts every next token: greedy decoding of it emits each answer."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def __call__(self, tokens):
        predicted = np.roll(tokens, -1, axis=1)
        nll = np.zeros((tokens.shape[0], tokens.shape[1] - 1))
        return nll, (predicted + 1) % TOK.vocab_size if self.wrong else predicted, {}


@pytest.mark.parametrize("task", RETRIEVAL)
def test_every_task_is_deterministic_and_an_oracle_scores_it_exactly(task):
    depth = 0.3 if task in DEPTH_TASKS else None
    a, b = probe(task, depth=depth, seed=1), probe(task, depth=depth, seed=1)
    assert np.array_equal(a.tokens, b.tokens) and a.answers == b.answers and len(a.tokens) == 600
    assert not np.array_equal(a.tokens, probe(task, depth=depth, seed=2).tokens)
    assert a.answers and all(0 < s < e <= 600 for s, e in a.answers)
    right, wrong = _forward_probes(Oracle(), [a])[0], _forward_probes(Oracle(wrong=True), [a])[0]
    assert all(s.exact and s.token_accuracy == 1.0 for s in right)
    assert not any(s.exact for s in wrong) and all(s.token_accuracy == 0.0 for s in wrong)


def test_answers_are_the_hidden_values():
    multi = probe("niah_multivalue", depth=0.2)
    assert [TOK.decode(multi.tokens[s:e]) for s, e in multi.answers] == multi.info["values"]
    chain = probe("vartrack")
    text = TOK.decode(chain.tokens)
    assert [TOK.decode(chain.tokens[s:e]) for s, e in chain.answers] == chain.info["names"]
    assert f"VAR {chain.info['names'][0]} = {chain.info['value']}." in text
    assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(chain.info["names"], chain.info["names"][1:]))
    recall = probe("mqar", size=12)
    facts = dict(pair.split("=") for pair in TOK.decode(recall.tokens).split("\n")[1].split("; "))
    assert len(facts) == 12 and len(recall.answers) == 12
    for start, end in recall.answers:
        assert TOK.decode(recall.tokens[start:end]) == facts[TOK.decode(recall.tokens[start - 4:start - 1])]


def test_a_near_miss_scores_per_token_but_not_exact():
    p = probe("passkey", depth=0.5)
    start, end = p.answers[0]
    predicted = np.roll(p.tokens, -1)
    predicted[end - 2] = (predicted[end - 2] + 1) % 10   # only the last digit wrong
    nll = np.zeros(599)
    nll[start - 1:end - 1] = np.log(10)
    [score] = score_answers(p, predicted, nll)
    assert not score.exact and score.token_accuracy == pytest.approx(0.8) and score.nll == pytest.approx(np.log(10))


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
                 "--loss_tokens", "1024", "--tasks", "loss,passkey,mqar,niah_multivalue", "--depths", "0,1",
                 "--samples", "1", "--no_progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert set(results["loss"]) == {"sparse", "dense"} and set(results["loss"]["dense"]) == {"256", "512"}
    for per_length in results["loss"].values():
        for value in per_length.values():
            assert f"{value['loss']:.4f} ({value['perplexity']:.2f})" in markdown
    assert set(results["layers"]["512"]["density"]) == {"1", "2"}
    assert f"| 1 | {results['layers']['512']['density']['1']:.3f} |" in markdown
    assert set(results["retrieval"]["passkey"]["sparse"]["512"]) == {"0.0", "1.0"}
    assert "256" not in results["retrieval"]["niah_multivalue"]["sparse"]   # too short, and said so
    assert any(reason.startswith("niah_multivalue at length 256") for reason in results["skipped"])
    mqar = results["retrieval"]["mqar"]["dense"]
    assert [mqar[n]["-"]["size"] for n in ("256", "512")] == [8, 16]   # sized to the length
    view = results["selection_map"]
    assert (view["layer"], view["length"]) == (1, 512) and f"hold {view['covered']:.1%}" in markdown
    blocks = np.load(out / "selection_map.npz")
    assert blocks["selected"].shape == blocks["scores"].shape == (16, 16)
    assert view["covered"] == pytest.approx((blocks["scores"] * blocks["selected"]).sum() / blocks["scores"].sum())
    for name in ("loss_vs_length.png", "layers.png", "selected_blocks.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "sparse  loss@512" in capsys.readouterr().out


def test_every_retrieval_task_writes_its_table_and_heatmap(sparse_run, tmp_path):
    out = tmp_path / "out"
    assert main([str(sparse_run), "--out", str(out), "--modes", "dense", "--min_len", "512", "--max_len", "512",
                 "--tasks", ",".join(RETRIEVAL), "--depths", "0.5", "--samples", "1", "--no_progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert set(results["retrieval"]) == set(RETRIEVAL) and not results["loss"]
    for task in RETRIEVAL:
        cell = next(iter(results["retrieval"][task]["dense"]["512"].values()))
        assert set(cell) == {"exact", "token_accuracy", "answer_nll", "answers", "size"}
        assert f"{task}, dense: exact match" in markdown
        assert (out / f"{task}.png").read_bytes().startswith(PNG_MAGIC)


def test_dense_flag_and_bad_inputs(sparse_run, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main([str(sparse_run), "--out", str(out), "--modes", "dense", "--tasks", "loss", "--min_len", "256",
                 "--max_len", "256", "--loss_tokens", "256", "--no_progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["loss"]) == ["dense"] and results["layers"] == {} and results["retrieval"] == {}
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


def test_loss_windows_never_cross_a_document(sparse_run):
    """The loss at a length is each held-out document's own loss: the same as running every
    document alone."""
    from sparsetrain.eval.measure import held_out
    from sparsetrain.eval.suite import EvalOptions, _loss_job

    subject = load_subject(sparse_run)
    runner = Runner(subject, "dense")
    stream = held_out(subject)
    value, _ = _loss_job(runner, stream, TOK.pad_id, 256, EvalOptions(lengths=(256,), loss_tokens=512))
    tokens = np.asarray(stream.tokens, np.int32)
    ends = [*stream.doc_starts[1:], len(tokens)]
    total, count, budget = 0.0, 0, 2 * 257   # the two windows cover the stream's first 514 tokens
    for start, end in zip(stream.doc_starts, ends):
        piece = tokens[start:min(end, budget)]
        if start >= budget:
            break
        # A document cut by a window edge continues in the next window as a new document.
        for first in range(start, start + len(piece), 257):
            cut = tokens[first:min(first - first % 257 + 257, end, budget)]
            if len(cut) > 1:
                total += float(runner(cut[None])[0].sum())
                count += len(cut) - 1
    assert value["loss"] == pytest.approx(total / count, rel=1e-4) and value["tokens"] == count
