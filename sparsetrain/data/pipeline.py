"""The grain pipeline: documents -> token stream -> packed windows -> shuffled, sharded batches.

Packing is concatenate-then-split: each split's documents, each followed by `eos_id`, form one token
stream that is cut into consecutive windows of `seq_len + 1` tokens (the last one padded with
`pad_id`), so no token is dropped or repeated. A window gives `inputs = w[:-1]`, `targets = w[1:]`.

Batch layout (per process, B = batch_size // process_count, L = seq_len):
  inputs      int32   [B, L]  token ids
  targets     int32   [B, L]  inputs shifted left by one
  loss_mask   float32 [B, L]  1 where the target is trained on (see `PackedWindows`)
  segment_ids int32   [B, L]  1-based document index within the window; 0 for padding. Only
                              when documents are masked (data.cross_document_attention=False, the
                              default): the model then attends only within equal ids.
  positions   int32   [B, L]  masked documents: each document's tokens count from 0 at its first
                              token in the window (a document continued from the previous window
                              restarts too; padding counts as one more document); with
                              cross-document attention: 0..L-1 in every row

With masked documents, restarting positions makes a packed row compute what each document would
alone (RoPE is relative, so attention itself does not change; the Seer gates' block positions and
float rounding at large positions do), and matches the position ids the exported model is given for
packed inputs (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator, Sequence

import grain
import numpy as np

from sparsetrain.config import DataConfig
from sparsetrain.errors import InputError
from sparsetrain.data.examples import Batch, window_example
from sparsetrain.data.retrieval_windows import RetrievalWindows
from sparsetrain.data.sources import iter_documents
from sparsetrain.data.tokenizers import Tokenizer, load_tokenizer

# Threads that assemble whole batches ahead of the trainer, and how many batches they may hold.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Documents concatenated, each followed by eos.

    tokens:     [num_tokens] uint16 (vocab <= 65536) or int32
    doc_starts: [num_documents] int64, offset of each document's first token in `tokens`
    """

    tokens: np.ndarray
    doc_starts: np.ndarray

    @classmethod
    def concat(cls, documents: Sequence[np.ndarray], eos_id: int, vocab_size: int) -> TokenStream:
        lengths = np.array([len(doc) + 1 for doc in documents], dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        tokens = np.empty(int(ends[-1]) if len(ends) else 0,
                          dtype=np.uint16 if vocab_size <= 2**16 else np.int32)
        for doc, start in zip(documents, starts):
            tokens[start:start + len(doc)] = doc
        tokens[ends - 1] = eos_id
        return cls(tokens=tokens, doc_starts=starts)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)


class PackedWindows:
    """Random-access source of examples; window i holds stream tokens [i*(L+1), (i+1)*(L+1)).

    `num_windows` may exceed what the stream fills: the extra windows are all padding (loss_mask 0),
    so validation can fill its last batch without counting any window twice.
    """

    def __init__(self, stream: TokenStream, seq_len: int, pad_id: int, num_windows: int | None = None,
                 *, cross_document_attention: bool = False):
        self.stream = stream
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.cross_document_attention = cross_document_attention
        self.num_filled = math.ceil(len(stream.tokens) / (seq_len + 1))
        self.num_windows = self.num_filled if num_windows is None else num_windows

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> Batch:
        """Example `index` -> dict of [L] arrays (layout in the module docstring)."""
        width = self.seq_len + 1
        start = min(int(index) * width, len(self.stream.tokens))
        real = self.stream.tokens[start:start + width]
        window = np.full(width, self.pad_id, dtype=np.int32)
        window[:len(real)] = real
        # Document number of every real token; the eos ending a document belongs to that document.
        doc = np.searchsorted(self.stream.doc_starts, np.arange(start, start + len(real)), side="right")
        return window_example(window, doc, cross_document_attention=self.cross_document_attention)


@dataclasses.dataclass(frozen=True)
class DataStats:
    """Sizes after the split; token counts include one eos per document."""

    num_train_documents: int
    num_val_documents: int
    num_train_tokens: int
    num_val_tokens: int
    num_train_windows: int
    num_val_windows: int


class Data:
    """The training and validation data of one process.

    train_iter(): a fresh, endless, checkpointable grain iterator of per-process batches.
    val_batches(n): the first batches of the (unshuffled) validation windows.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, train: TokenStream, val: TokenStream,
                 *, process_index: int, process_count: int):
        self.tokenizer = tokenizer
        self.seq_len = cfg.seq_len
        self.batch_size = cfg.batch_size // process_count  # per process
        self.process_index = process_index
        self.process_count = process_count
        self.cross_document_attention = cfg.cross_document_attention
        self.retrieval = cfg.retrieval
        self._train_windows = self._windows(train)
        self._retrieval_windows = None
        if cfg.retrieval.weight:
            self._retrieval_windows = RetrievalWindows(
                cfg.retrieval, tokenizer, cfg.seq_len, cfg.seed,
                text=train.tokens[train.tokens != tokenizer.eos_id].astype(np.int32),
                cross_document_attention=cfg.cross_document_attention)
        self._val = val
        self.stats = DataStats(
            num_train_documents=train.num_documents, num_val_documents=val.num_documents,
            num_train_tokens=len(train.tokens), num_val_tokens=len(val.tokens),
            num_train_windows=len(self._train_windows),
            num_val_windows=len(self._windows(val)))
        self.train_dataset = self._train_dataset(cfg.seed if cfg.shuffle else None)

    def _windows(self, stream: TokenStream, num_windows: int | None = None) -> PackedWindows:
        return PackedWindows(stream, self.seq_len, self.tokenizer.pad_id, num_windows,
                             cross_document_attention=self.cross_document_attention)

    def _train_dataset(self, shuffle_seed: int | None) -> grain.IterDataset:
        ds = grain.MapDataset.source(self._train_windows)
        if shuffle_seed is not None:
            ds = ds.shuffle(_grain_seed(shuffle_seed))
        # Endless epochs, each reshuffled. Slicing the global order per process keeps the global batch
        # independent of process_count: step k covers global examples [k*batch_size, (k+1)*batch_size).
        ds = ds.repeat()
        if self._retrieval_windows is not None:
            # grain's mix interleaves by weight deterministically: example i's source and index are a
            # function of i, so the mix resumes from the iterator's index like the text alone.
            weight = self.retrieval.weight
            ds = grain.MapDataset.mix([ds, grain.MapDataset.source(self._retrieval_windows)], [1 - weight, weight])
        ds = ds[self.process_index::self.process_count]
        return ds.batch(self.batch_size, drop_remainder=True).to_iter_dataset(READ_OPTIONS)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each field of a global batch, without reading one: the step can be
        compiled (and its memory checked) before the pipeline starts filling its buffers."""
        example = self._train_windows[0]
        rows = self.batch_size * self.process_count
        return {key: ((rows, *value.shape), value.dtype) for key, value in example.items()}

    def train_iter(self) -> grain.DatasetIterator:
        """A new iterator from the first batch; `get_state()`/`set_state()` resume it exactly."""
        return iter(self.train_dataset)

    def val_batches(self, num_batches: int) -> Iterator[Batch]:
        """At most `num_batches` batches [B, L] covering the validation windows in order, each once.

        The count is the same on every process (min(num_batches, windows / global batch, rounded
        up)); the last batch is filled with all-padding windows whose loss_mask is 0.
        """
        global_batch = self.batch_size * self.process_count
        count = min(num_batches, math.ceil(self.stats.num_val_windows / global_batch))
        windows = self._windows(self._val, num_windows=count * global_batch)
        ds = grain.MapDataset.source(windows)[self.process_index::self.process_count]
        ds = ds.batch(self.batch_size)
        return (ds[i] for i in range(len(ds)))


def build_data(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> Data:
    """Reads, tokenizes, splits and packs the configured corpus for one of `process_count` processes.

    Raises ValueError for unusable inputs (named in the message), a batch that does not divide across
    processes, or a corpus with fewer than 2 documents (train and validation need one each).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise InputError(f"data.batch_size={cfg.batch_size} is not divisible by "
                         f"process_count={process_count}")
    if cfg.seed < 0:
        raise InputError(f"data.seed={cfg.seed} must be >= 0")
    tokenizer = load_tokenizer(cfg.tokenizer)
    documents = tokenize_documents(cfg, tokenizer)
    train_ids, val_ids = split_documents(len(documents), cfg.val_fraction, cfg.seed)

    def stream(ids: np.ndarray) -> TokenStream:
        return TokenStream.concat([documents[i] for i in ids], tokenizer.eos_id, tokenizer.vocab_size)

    return Data(cfg, tokenizer, stream(train_ids), stream(val_ids),
                process_index=process_index, process_count=process_count)


def tokenize_documents(cfg: DataConfig, tokenizer: Tokenizer) -> list[np.ndarray]:
    """The first `cfg.max_documents` (0 = all) documents of the source -> int32 ids [n] each."""
    documents = iter_documents(cfg, tokenizer.vocab_size)
    documents = list(itertools.islice(documents, cfg.max_documents or None))
    if documents and isinstance(documents[0], str):
        return tokenizer.encode_batch(documents)
    return documents


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random document split -> (train ids, val ids), each sorted, so streams keep source order.

    round(val_fraction * num_documents) go to validation, clipped so each side has at least one.
    """
    if num_documents < 2:
        raise InputError(f"the corpus has {num_documents} document(s); train and validation need at "
                         "least one each")
    num_val = min(max(1, round(val_fraction * num_documents)), num_documents - 1)
    order = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def _grain_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e, so raw seeds s and s+1 would share epoch orders shifted by
    # one; hashing the config seed keeps different seeds' orders unrelated.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])
