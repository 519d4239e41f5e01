"""Document sources: the embedded stdlib corpus, text/JSONL files, and pre-tokenized files.

Every source yields documents in a deterministic order (sorted paths, then order within a file).
Text is decoded as UTF-8 with errors="replace": undecodable bytes become U+FFFD instead of stopping a
run over one odd file. A file that is not text at all (a NUL byte, or more than
MAX_REPLACEMENT_FRACTION of its characters undecodable: binary data, UTF-16, an image renamed .txt)
is skipped with a warning naming it, or is an error with data.on_bad_file=error. Missing,
unreadable, corrupt or empty inputs raise ValueError naming the file.

Pre-tokenized layouts (ids must lie in [0, vocab_size); the pipeline appends eos, so files hold none):
  - `.npy`, 1-D integer array: one document.
  - `.npy`, 2-D integer array [num_documents, max_len]: one document per row, right-padded with
    negative values (e.g. -1), which are stripped. Object arrays are refused (they need pickle).
  - ArrayRecord (`.array_record` / `.arrayrecord`): one document per record, its ids as little-endian
    int32 bytes.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from sparsetrain.config import DataConfig
from sparsetrain.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".json")
JSONL_SUFFIXES = (".jsonl", ".json")   # both read as JSON lines: one object per line
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
TOKEN_SUFFIXES = (".npy", *ARRAY_RECORD_SUFFIXES)
# Installed packages are not the stdlib; test folders hold deliberately malformed and generated data.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                              "__pycache__"})
# Text in another 8-bit encoding has a few undecodable characters (accents); random bytes decode to
# about half U+FFFD.
MAX_REPLACEMENT_FRACTION = 0.25


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files, sorted."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP_DIRS]  # prune, don't walk
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def find_files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a directory (searched recursively for `suffixes`, hidden entries skipped) or a glob
    (every matching file, whatever its suffix) -> sorted file paths. Raises ValueError if none."""
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    elif Path(path).is_dir():
        root = Path(path)
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix in suffixes
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise InputError(f"data path {path} does not exist")
    if not files:
        raise InputError(f"data path {path} matches no files (looked for {', '.join(suffixes)})")
    return files


def read_text_documents(files: Iterable[Path], jsonl_field: str, *, skip_empty: bool = False,
                        on_bad_file: str = "skip") -> Iterator[str]:
    """One document per plain-text file, one per JSON line (its `jsonl_field`) for .jsonl/.json.

    A file without documents raises ValueError unless `skip_empty` (the stdlib has empty `__init__.py`s).
    A file that is not text is skipped with a warning on stderr, or raises with on_bad_file="error".
    """
    skipped = 0
    for path in files:
        raw = _read_bytes(path)
        text = raw.decode("utf-8", errors="replace")
        if reason := _not_text_reason(raw, text):
            if on_bad_file == "error":
                raise InputError(f"{path} is not text ({reason}); data.on_bad_file=error "
                                 f"('skip' trains without it)")
            skipped += 1
            print(f"warning: skipping {path}: not text ({reason}); {skipped} file(s) skipped so far "
                  f"(data.on_bad_file=error stops instead)", file=sys.stderr)
            continue
        if path.suffix in JSONL_SUFFIXES:
            documents = _jsonl_documents(path, text, jsonl_field)
        else:
            documents = [text] if text.strip() else []
        if not documents and not skip_empty:
            raise InputError(f"{path} is empty (no documents)")
        yield from documents


def read_token_documents(files: Iterable[Path], vocab_size: int) -> Iterator[np.ndarray]:
    """Pre-tokenized documents (layouts in the module docstring) -> int32 ids [n] each."""
    for path in files:
        if path.suffix == ".npy":
            documents = _npy_documents(path)
        elif path.suffix in ARRAY_RECORD_SUFFIXES:
            documents = _array_record_documents(path)
        else:
            raise InputError(f"{path}: unsupported token file type (use one of {', '.join(TOKEN_SUFFIXES)})")
        if not documents:
            raise InputError(f"{path} is empty (no documents)")
        for doc in documents:
            if doc.min() < 0 or doc.max() >= vocab_size:
                raise InputError(f"{path}: token ids span [{doc.min()}, {doc.max()}], outside the "
                                 f"tokenizer's [0, {vocab_size})")
            yield doc.astype(np.int32)


def iter_documents(cfg: DataConfig, vocab_size: int) -> Iterator[str] | Iterator[np.ndarray]:
    """The configured source's documents: str for text sources, int32 id arrays for "tokens"."""
    if cfg.source == "stdlib":
        return read_text_documents(stdlib_files(), cfg.jsonl_field, skip_empty=True)
    if cfg.source == "files":
        return read_text_documents(find_files(cfg.path, TEXT_SUFFIXES), cfg.jsonl_field, on_bad_file=cfg.on_bad_file)
    return read_token_documents(find_files(cfg.path, TOKEN_SUFFIXES), vocab_size)


def _not_text_reason(raw: bytes, text: str) -> str | None:
    """Why a file's bytes are not text (`text`: them decoded with errors="replace"), or None."""
    if b"\0" in raw:
        return f"{raw.count(0)} NUL byte(s)"
    undecodable = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if text and undecodable > MAX_REPLACEMENT_FRACTION * len(text):
        return f"{undecodable / len(text):.0%} of its characters are not UTF-8"
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e


def _jsonl_documents(path: Path, text: str, field: str) -> list[str]:
    documents = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other line separators.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise InputError(f"{path}:{line_number}: expected an object with field {field!r}")
        value = record[field]
        if not isinstance(value, str):
            raise InputError(f"{path}:{line_number}: field {field!r} is {type(value).__name__}, not a string")
        if value:
            documents.append(value)
    return documents


def _npy_documents(path: Path) -> list[np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npy file: {e}") from e
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path}: expected an integer array, got {getattr(array, 'dtype', type(array))}")
    if array.ndim not in (1, 2):
        raise InputError(f"{path}: expected a 1-D or 2-D array, got shape {array.shape}")
    if array.size == 0:
        return []
    if array.ndim == 1:
        return [array]
    # Row length = position after its last non-negative id; all-padding rows are dropped.
    lengths = array.shape[1] - np.argmax(array[:, ::-1] >= 0, axis=1)
    lengths[(array < 0).all(axis=1)] = 0
    return [row[:n] for row, n in zip(array, lengths) if n]


def _array_record_documents(path: Path) -> list[np.ndarray]:
    try:
        reader = ArrayRecordReader(str(path))
        if not reader.ok():  # a reader that failed to open must not be closed: close() raises too
            raise RuntimeError("not an ArrayRecord file")
        records = reader.read_all()
        reader.close()
    except RuntimeError as e:
        raise InputError(f"{path} is not a readable ArrayRecord file: {e}") from e
    for index, record in enumerate(records):
        if len(record) % 4:
            raise InputError(f"{path}: record {index} has {len(record)} bytes, not whole int32 ids")
    return [np.frombuffer(record, dtype="<i4") for record in records if record]
