import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparsetrain.data import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_utf8_and_drops_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.pad_id]])) == "héllo ✓"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)


def test_byte_tokenizer_save_and_load(tmp_path):
    path = ByteTokenizer().save(tmp_path)
    assert path.name == "byte_tokenizer.json"
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    assert isinstance(load_tokenizer(str(path)), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def word_level_file(tmp_path, vocab):
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wordlevel.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_finds_eos_and_adds_missing_pad(tmp_path):
    path = word_level_file(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3})
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 3
    assert tok.pad_id == 4 and tok.vocab_size == 5   # "<pad>" appended as a special token
    ids = tok.encode("hello world hello")
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 1]
    assert tok.decode([1, 2, tok.eos_id]) == "hello world"
    assert [i.tolist() for i in tok.encode_batch(["world", "hello"])] == [[2], [1]]

    saved = tok.save(tmp_path / "out")
    assert saved.name == "tokenizer.json"
    again = load_tokenizer(str(tmp_path / "out"))
    assert (again.eos_id, again.pad_id, again.vocab_size) == (3, 4, 5)


def test_hf_bpe_tokenizer_with_trained_specials(tmp_path):
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<|endoftext|>"])
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    tok.save(str(tmp_path / "bpe.json"))

    loaded = HFTokenizer(tmp_path / "bpe.json")
    assert (loaded.pad_id, loaded.eos_id) == (1, 2)
    assert loaded.vocab_size == tok.get_vocab_size()
    text = "def f(x):\n    return x + 1\n"
    assert loaded.decode(loaded.encode(text)) == text


def test_missing_tokenizer_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_corrupt_tokenizer_file_names_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"model": 3')
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(str(path))
