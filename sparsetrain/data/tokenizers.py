"""Tokenizers: a byte-level default that needs no files, and Hugging Face `tokenizers` JSON files.

Both expose `vocab_size`, `eos_id` (appended after every document), `pad_id` (fills the last partial
window), `encode`, `encode_batch`, `decode` and `save`. `vocab_size` counts every id the tokenizer can
emit, specials included, so a trainer can check `model.vocab_size >= tokenizer.vocab_size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from sparsetrain.errors import InputError

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
TRANSFORMERS_CONFIG_FILE = "tokenizer_config.json"

# Special tokens looked up (in this order) in a Hugging Face vocabulary; the first present one is used.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
# Added as special tokens when no candidate is in the vocabulary.
ADDED_EOS = "<|endoftext|>"
ADDED_PAD = "<pad>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...
    def save(self, directory: str | Path) -> Path: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then `eos_id` = 256 and `pad_id` = 257 (`vocab_size` = 258)."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids [num_bytes] (no eos; the pipeline appends it)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids [n] -> text; eos/pad are dropped and invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        """Writes `byte_tokenizer.json` describing the scheme (what `load_tokenizer` reads back) and
        the same ids as a Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json`) for
        transformers' AutoTokenizer; returns the path of `byte_tokenizer.json`."""
        path = Path(directory) / BYTE_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"type": "byte", "encoding": "utf-8", "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}
        path.write_text(json.dumps(spec, indent=2) + "\n")
        _save_for_transformers(self.as_hf_tokenizer(), path.parent, self.eos_id, self.pad_id)
        return path

    def as_hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The same ids as a `tokenizers` BPE without merges: each byte is the GPT-2 byte-level
        character with id = byte value, then eos and pad as special tokens (256, 257). The one
        difference: the literal text "<|endoftext|>" or "<pad>" encodes to the special id."""
        vocab = {char: byte for byte, char in _byte_level_chars().items()}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        # No regex split and no prefix space: the whole text is one byte string, as in `encode`.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([ADDED_EOS, ADDED_PAD])
        assert (tok.token_to_id(ADDED_EOS), tok.token_to_id(ADDED_PAD)) == (self.eos_id, self.pad_id)
        return tok


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file.

    eos/pad rule: the first of `EOS_CANDIDATES` / `PAD_CANDIDATES` found in the vocabulary (added
    tokens included) is used; if none is there, `ADDED_EOS` / `ADDED_PAD` is added as a special token,
    which grows `vocab_size`. `save` writes the tokenizer with those additions, so reloading it gives
    the same ids.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise InputError(f"tokenizer file {self.path} is not a valid Hugging Face tokenizer: {e}") from e
        self.eos_id = self._special_id(EOS_CANDIDATES, ADDED_EOS)
        self.pad_id = self._special_id(PAD_CANDIDATES, ADDED_PAD)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, candidates: tuple[str, ...], fallback: str) -> int:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        self._tok.add_special_tokens([fallback])
        return self._tok.token_to_id(fallback)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids [n] (no special tokens added; the pipeline appends eos)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids [n] -> text; eos, pad and other special tokens are dropped."""
        ids = np.asarray(ids)
        kept = ids[(ids != self.eos_id) & (ids != self.pad_id)]  # eos may be an ordinary vocab entry
        return self._tok.decode(kept.tolist(), skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        """Writes `tokenizer.json` (loadable by `tokenizers` and `transformers`) and
        `tokenizer_config.json` naming eos/pad for transformers; returns the tokenizer.json path."""
        return _save_for_transformers(self._tok, Path(directory), self.eos_id, self.pad_id)


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of `pre_tokenizers.ByteLevel`:
    printable Latin-1 bytes map to themselves, the other bytes to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _save_for_transformers(tok: tokenizers.Tokenizer, directory: Path, eos_id: int, pad_id: int) -> Path:
    """tokenizer.json plus the tokenizer_config.json that tells transformers which tokens are eos
    and pad (no bos: our pipeline never inserts one)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HF_TOKENIZER_FILE
    tok.save(str(path))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.id_to_token(eos_id),
              "pad_token": tok.id_to_token(pad_id), "bos_token": None, "clean_up_tokenization_spaces": False}
    (directory / TRANSFORMERS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """"byte", a tokenizer JSON file, or a directory written by `save` -> a tokenizer.

    Raises ValueError naming the file when it is missing or cannot be parsed.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        byte_file = path / BYTE_TOKENIZER_FILE
        path = byte_file if byte_file.exists() else path / HF_TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"tokenizer file {path} does not exist")
    if _is_byte_spec(path):
        return ByteTokenizer()
    return HFTokenizer(path)


def _is_byte_spec(path: Path) -> bool:
    """True for a file written by `ByteTokenizer.save` (small JSON with "type": "byte")."""
    if path.stat().st_size > 4096:
        return False
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not ours; HFTokenizer then reports what is wrong with it
    return isinstance(spec, dict) and spec.get("type") == "byte"
