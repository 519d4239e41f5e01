"""Synthetic retrieval documents in the training mix: generators, the grain mix, and its resume."""

import itertools

import numpy as np
import pytest

from sparsetrain.config import RETRIEVAL_TASKS, DataConfig, RetrievalDataConfig
from sparsetrain.configbase import ConfigError, apply_overrides
from sparsetrain.config import RunConfig
from sparsetrain.data import ByteTokenizer, build_data
from sparsetrain.data.retrieval_tasks import EVAL, TRAIN, MQAR_ALPHABET, VAR_ALPHABET
from sparsetrain.data.retrieval_windows import RetrievalWindows

TOK = ByteTokenizer()
SEQ_LEN = 512


def windows(**overrides):
    return RetrievalWindows(RetrievalDataConfig(**{"weight": 0.5, "whole_window": 0.0, **overrides}), TOK,
                            SEQ_LEN, seed=0)


def test_training_and_evaluation_never_share_keys_filler_or_seeds():
    assert not set(TRAIN.filler) & set(EVAL.filler) and TRAIN.domain != EVAL.domain
    draws = 3000
    for draw in (lambda lex, rng: lex.word(rng), lambda lex, rng: lex.letters(rng, 3, MQAR_ALPHABET),
                 lambda lex, rng: lex.letters(rng, 5, VAR_ALPHABET)):
        train = {draw(TRAIN, TRAIN.rng(i)) for i in range(draws)}
        evaluation = {draw(EVAL, EVAL.rng(i)) for i in range(draws)}
        assert len(train) > draws // 2 and not train & evaluation
    # Same seed numbers, different streams.
    assert TRAIN.rng(5).integers(1 << 30) != EVAL.rng(5).integers(1 << 30)


def test_windows_are_deterministic_whole_documents():
    source = windows()
    a, b = source[7], source[7]
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["inputs"], source[8]["inputs"])
    docs = source.documents(7)
    assert sum(len(d) for d in docs) == SEQ_LEN + 1 and all(d[-1] == TOK.eos_id for d in docs)
    assert all((d[:-1] != TOK.eos_id).all() for d in docs)   # one document, one eos, at its end
    assert a["loss_mask"].sum() == SEQ_LEN - (len(docs) - 1)  # only document boundaries are masked
    assert a["segment_ids"].max() == len(docs)
    lengths = [len(d) for i in range(200) for d in source.documents(i)]
    assert min(lengths) >= 128 and max(lengths) > SEQ_LEN // 2   # spread up to the window


def test_a_share_of_windows_is_one_document_of_the_whole_length():
    def whole_share(share):
        source = windows(whole_window=share)
        return np.mean([len(source.documents(i)) == 1 for i in range(400)])
    # Log-uniform packing alone also gives some one-document windows (a first document that leaves
    # too little room for a second): share s adds s of the rest.
    packed = whole_share(0.0)
    assert whole_share(0.5) == pytest.approx(packed + 0.5 * (1 - packed), abs=0.08)


def test_every_task_appears_in_training_windows():
    source = windows()
    text = "".join(TOK.decode(source[i]["inputs"]) for i in range(60))
    for marker in ("pass key is", "special magic number for", "are all the special magic numbers",
                   "Remember these pairs", "VAR ", "Copy this: "):
        assert marker in text, marker


def test_the_mix_keeps_its_weight_and_resumes_exactly(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"{i}.txt").write_text(f"document {i} " * 40)
    cfg = DataConfig(source="files", path=str(root), seq_len=64, batch_size=4, val_fraction=0.1,
                     retrieval=RetrievalDataConfig(weight=0.25, min_doc_len=32))
    data = build_data(cfg)
    iterator = data.train_iter()
    batches = list(itertools.islice(iterator, 100))
    synthetic = [("document" not in TOK.decode(row)) for b in batches for row in b["inputs"]]
    assert np.mean(synthetic) == pytest.approx(0.25, abs=0.03)
    state = iterator.get_state()
    after = list(itertools.islice(iterator, 3))
    resumed = data.train_iter()
    resumed.set_state(state)
    for x, y in zip(after, itertools.islice(resumed, 3)):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    val = next(data.val_batches(1))
    assert "document" in TOK.decode(val["inputs"][0])   # validation stays text


def test_bad_mix_fields_are_named():
    for override, message in [("data.retrieval.weight=1.0", "weight=1.0: must be in [0, 1)"),
                              ("data.retrieval.tasks=passkey,recall", "choose one of"),
                              ("data.retrieval.min_doc_len=8", "min_doc_len=8: must be >= 32")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            apply_overrides(RunConfig(), [override])
    assert RETRIEVAL_TASKS[-1] == "copy"
