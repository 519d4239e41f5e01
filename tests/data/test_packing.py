import numpy as np

from sparsetrain.data import PackedWindows, TokenStream

EOS, PAD = 256, 257


def windows(docs, seq_len, num_windows=None):
    stream = TokenStream.concat([np.array(d, dtype=np.int32) for d in docs], EOS, vocab_size=258)
    return PackedWindows(stream, seq_len, PAD, num_windows)


def test_stream_appends_eos_after_every_document():
    stream = TokenStream.concat([np.array([1, 2]), np.array([], dtype=np.int32), np.array([3])], EOS, 258)
    assert stream.tokens.tolist() == [1, 2, EOS, EOS, 3, EOS]
    assert stream.doc_starts.tolist() == [0, 3, 4]
    assert stream.tokens.dtype == np.uint16


def test_stream_uses_int32_for_large_vocabularies():
    stream = TokenStream.concat([np.array([70_000])], 70_001, vocab_size=70_002)
    assert stream.tokens.dtype == np.int32 and stream.tokens.tolist() == [70_000, 70_001]


def test_masks_and_segments_at_document_boundaries_and_padding():
    # stream: 1 2 3 E | 4 5 E | 6 E  -> windows of 5: [1 2 3 E 4] [5 E 6 E P]
    packed = windows([[1, 2, 3], [4, 5], [6]], seq_len=4)
    assert len(packed) == 2
    first, last = packed[0], packed[1]

    assert first["inputs"].tolist() == [1, 2, 3, EOS]
    assert first["targets"].tolist() == [2, 3, EOS, 4]
    assert first["segment_ids"].tolist() == [1, 1, 1, 1]
    assert first["loss_mask"].tolist() == [1, 1, 1, 0]      # EOS -> 4 crosses into document 2

    assert last["inputs"].tolist() == [5, EOS, 6, EOS]
    assert last["targets"].tolist() == [EOS, 6, EOS, PAD]
    assert last["segment_ids"].tolist() == [1, 1, 2, 2]     # renumbered from 1 in every window
    assert last["loss_mask"].tolist() == [1, 0, 1, 0]       # crossing, then a padding target

    assert first["positions"].tolist() == [0, 1, 2, 3]
    assert last["positions"].tolist() == [0, 1, 0, 1]      # restart with every document
    for example in (first, last):
        assert {k: v.dtype for k, v in example.items()} == {
            "inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32}


def test_cross_document_attention_drops_segment_ids_and_counts_positions_through():
    stream = TokenStream.concat([np.array(d, dtype=np.int32) for d in ([1, 2, 3], [4, 5], [6])], EOS, 258)
    last = PackedWindows(stream, 4, PAD, cross_document_attention=True)[1]
    assert "segment_ids" not in last and last["positions"].tolist() == [0, 1, 2, 3]
    assert last["loss_mask"].tolist() == [1, 0, 1, 0]


def test_padding_inputs_have_segment_zero():
    packed = windows([[1, 2]], seq_len=6)   # stream 1 2 E, window [1 2 E P P P P]
    example = packed[0]
    assert example["segment_ids"].tolist() == [1, 1, 1, 0, 0, 0]
    assert example["positions"].tolist() == [0, 1, 2, 0, 1, 2]   # padding counts as one more document
    assert example["loss_mask"].tolist() == [1, 1, 0, 0, 0, 0]


def test_windows_past_the_stream_are_all_padding():
    packed = windows([[1, 2, 3]], seq_len=3, num_windows=3)
    assert len(packed) == 3
    example = packed[2]
    assert (example["inputs"] == PAD).all() and (example["targets"] == PAD).all()
    assert not example["segment_ids"].any() and not example["loss_mask"].any()


def test_packing_is_lossless():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=rng.integers(1, 40)) for _ in range(50)]
    packed = windows(docs, seq_len=16)
    rows = [np.concatenate([packed[i]["inputs"], packed[i]["targets"][-1:]]) for i in range(len(packed))]
    stream = np.concatenate(rows)
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    assert (stream[:len(expected)] == expected).all()
    assert (stream[len(expected):] == PAD).all() and len(stream) - len(expected) < 17
