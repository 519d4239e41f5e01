import itertools
import json
import re

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from sparsetrain.config import DataConfig
from sparsetrain.data import ByteTokenizer, build_data, split_documents

PAD = ByteTokenizer.pad_id
SEQ_LEN = 16
NUM_DOCS = 40


@pytest.fixture
def corpus(tmp_path):
    """NUM_DOCS text files: a unique marker `<i>`, then random letters, so windows are all distinct."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    texts = [f"<{i}> " + "".join(rng.choice(letters, size=rng.integers(5, 60))) for i in range(NUM_DOCS)]
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(text)
    return root, texts


def config(path, **overrides):
    return DataConfig(**{"source": "files", "path": str(path), "seq_len": SEQ_LEN, "batch_size": 4,
                         "val_fraction": 0.2, **overrides})


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def real_tokens(batches):
    """Concatenated window tokens (inputs plus the last target) with padding removed."""
    rows = [np.concatenate([inputs, targets[-1:]])
            for batch in batches for inputs, targets in zip(batch["inputs"], batch["targets"])]
    tokens = np.concatenate(rows)
    return tokens[tokens != PAD]


def markers(tokens):
    return {int(m) for m in re.findall(r"<(\d+)>", ByteTokenizer().decode(tokens))}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batch_layout(corpus):
    data = build_data(config(corpus[0]))
    batch = next(data.train_iter())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, SEQ_LEN), np.int32), "targets": ((4, SEQ_LEN), np.int32),
        "loss_mask": ((4, SEQ_LEN), np.float32), "segment_ids": ((4, SEQ_LEN), np.int32),
        "positions": ((4, SEQ_LEN), np.int32)}
    assert data.tokenizer.vocab_size == 258


def test_cross_document_attention_reaches_train_and_validation_batches(corpus):
    data = build_data(config(corpus[0], cross_document_attention=True))
    for batch in (next(data.train_iter()), next(data.val_batches(1))):
        assert "segment_ids" not in batch
        assert (batch["positions"] == np.arange(SEQ_LEN)).all()


def test_unshuffled_epoch_is_the_lossless_train_stream(corpus):
    path, texts = corpus
    data = build_data(config(path, shuffle=False, batch_size=1))
    epoch = take(data.train_iter(), data.stats.num_train_windows)
    train_ids, _ = split_documents(NUM_DOCS, 0.2, seed=0)
    tok = ByteTokenizer()
    expected = np.concatenate([np.append(tok.encode(texts[i]), tok.eos_id) for i in train_ids])
    np.testing.assert_array_equal(real_tokens(epoch), expected)
    assert data.stats.num_train_tokens == len(expected)
    assert data.stats.num_train_documents == len(train_ids) == NUM_DOCS - 8


def test_validation_documents_are_disjoint_from_training(corpus):
    data = build_data(config(corpus[0], shuffle=False))
    train = markers(real_tokens(take(data.train_iter(), data.stats.num_train_windows)))
    val = markers(real_tokens(data.val_batches(1000)))
    assert len(val) == data.stats.num_val_documents == 8
    assert train.isdisjoint(val) and train | val == set(range(NUM_DOCS))


def test_same_seed_same_batches_other_seed_other_order(corpus):
    first = take(build_data(config(corpus[0], seed=3)).train_iter(), 6)
    assert_same_batches(first, take(build_data(config(corpus[0], seed=3)).train_iter(), 6))
    other = take(build_data(config(corpus[0], seed=4)).train_iter(), 6)
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first, other))


def test_every_epoch_is_a_new_permutation_of_the_windows(corpus):
    data = build_data(config(corpus[0], batch_size=1))
    n = data.stats.num_train_windows
    rows = [b["inputs"][0].tobytes() for b in take(data.train_iter(), 2 * n)]
    assert sorted(rows[:n]) == sorted(rows[n:]) and len(set(rows[:n])) == n
    assert rows[:n] != rows[n:]


def test_state_restore_resumes_at_the_exact_next_batch(corpus):
    cfg = config(corpus[0])
    data = build_data(cfg)
    reference = take(data.train_iter(), 30)
    assert 25 * 4 > data.stats.num_train_windows   # the saved position is past the first epoch
    iterator = data.train_iter()
    take(iterator, 25)
    state = json.loads(json.dumps(iterator.get_state()))

    resumed = build_data(cfg).train_iter()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), reference[25:])


def test_state_restore_through_orbax(corpus, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = config(corpus[0])
    iterator = build_data(cfg).train_iter()
    take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        resumed = build_data(cfg).train_iter()
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches([next(resumed)], [next(iterator)])


def test_processes_split_each_global_batch_disjointly(corpus):
    cfg = config(corpus[0], batch_size=4)
    steps = 3   # 12 windows, fewer than one epoch, so every row is a distinct window
    global_batches = take(build_data(cfg).train_iter(), steps)
    shards = [take(build_data(cfg, process_index=p, process_count=2).train_iter(), steps) for p in (0, 1)]
    seen = [{row.tobytes() for batch in shard for row in batch["inputs"]} for shard in shards]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 2 * steps
    for step, global_batch in enumerate(global_batches):
        for p, shard in enumerate(shards):
            assert shard[step]["inputs"].shape == (2, SEQ_LEN)
            np.testing.assert_array_equal(shard[step]["inputs"], global_batch["inputs"][p::2])


def test_validation_batches_are_finite_deterministic_and_cover_each_window_once(corpus):
    cfg = config(corpus[0], batch_size=2)
    data = build_data(cfg)
    windows = data.stats.num_val_windows
    assert len(list(data.val_batches(2))) == 2
    everything = list(data.val_batches(1000))
    assert len(everything) == -(-windows // 2)
    assert_same_batches(everything, list(build_data(cfg).val_batches(1000)))
    real_rows = sum(int(batch["segment_ids"][:, 0].astype(bool).sum()) for batch in everything)
    assert real_rows == windows

    shards = [list(build_data(cfg, process_index=p, process_count=2).val_batches(1000)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == -(-windows // 2)
    assert all(batch["inputs"].shape == (1, SEQ_LEN) for shard in shards for batch in shard)


def test_batch_must_divide_across_processes(corpus):
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by process_count=3"):
        build_data(config(corpus[0]), process_index=0, process_count=3)


def test_a_single_document_cannot_be_split(tmp_path):
    (tmp_path / "only.txt").write_text("just one")
    with pytest.raises(ValueError, match="1 document"):
        build_data(config(tmp_path))


def test_stdlib_source_with_few_documents():
    data = build_data(DataConfig(max_documents=6, seq_len=32, batch_size=2))
    assert data.stats.num_train_documents + data.stats.num_val_documents == 6
    batch = next(data.train_iter())
    assert batch["inputs"].shape == (2, 32) and batch["loss_mask"].sum() > 0


def test_token_sources_feed_the_pipeline(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(1, 30, dtype=np.int32))
    np.save(tmp_path / "b.npy", np.array([[7, 8, 9, -1], [10, 11, 12, 13]], dtype=np.int64))
    writer = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
    for doc in ([100, 101], [102, 103, 104]):
        writer.write(np.array(doc, dtype="<i4").tobytes())
    writer.close()
    data = build_data(config(tmp_path, source="tokens", shuffle=False, batch_size=1))
    assert data.stats.num_train_documents + data.stats.num_val_documents == 5
    assert data.stats.num_train_tokens + data.stats.num_val_tokens == 29 + 3 + 4 + 2 + 3 + 5


def test_hugging_face_tokenizer_feeds_the_pipeline(corpus, tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "<": 1, ">": 2, "a": 3}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "words.json"))
    data = build_data(config(corpus[0], tokenizer=str(tmp_path / "words.json"), seq_len=8))
    assert (data.tokenizer.eos_id, data.tokenizer.pad_id, data.tokenizer.vocab_size) == (4, 5, 6)
    batch = next(data.train_iter())
    assert batch["inputs"].max() <= 5
