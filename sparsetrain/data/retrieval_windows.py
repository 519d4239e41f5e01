"""Training windows made of synthetic retrieval documents: a grain source mixed with the text windows.

Window i is generated from (data.seed, i) alone, so the source is endless, random-access and
stateless: a grain iterator over the mix resumes exactly from its saved index, as the text
source's does. Each window holds whole documents, each a task instance (`retrieval_tasks`) plus
eos. A `whole_window` share of the windows is one document as long as the window; the others
draw lengths log-uniformly between `min_doc_len` and the window, the last document stretching to
fill it, so no token is padding and retrievals of every distance up to the trained length occur. The examples have the text windows' layout (`examples.window_example`): with documents
masked (data.cross_document_attention=False) each document attends only to itself, with restarted
positions, and every document is trained on whole, answers included.
"""

from __future__ import annotations

import sys

import numpy as np

from sparsetrain.config import RetrievalDataConfig
from sparsetrain.data.examples import Batch, window_example
from sparsetrain.data.retrieval_tasks import DEPTH_TASKS, TRAIN, Haystack, generate
from sparsetrain.data.tokenizers import Tokenizer
from sparsetrain.errors import InputError

# Training MQAR keeps at most this many pairs (the longest documents would otherwise hold hundreds),
# and at most one pair per MQAR_TRAIN_PAIR_TOKENS tokens of the document (a pair and its query take
# about 20 byte-level tokens), so the pairs fit.
MAX_TRAIN_PAIRS = 64
MQAR_TRAIN_PAIR_TOKENS = 24


class RetrievalWindows:
    """Endless random-access source of [L + 1]-token windows of retrieval documents."""

    def __init__(self, cfg: RetrievalDataConfig, tokenizer: Tokenizer, seq_len: int, seed: int,
                 text: np.ndarray | None = None, *, cross_document_attention: bool = False):
        """text: training token ids without eos, the real-text haystack (None: noise only)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.haystack = Haystack(tokenizer, TRAIN, text)
        self.cross_document_attention = cross_document_attention

    def __len__(self) -> int:
        return sys.maxsize   # endless: any index is a window

    def documents(self, index: int) -> list[np.ndarray]:
        """Window `index`'s documents (each an instance's tokens followed by eos), filling L + 1."""
        rng = TRAIN.rng(self.seed, index)
        width = self.seq_len + 1
        if rng.random() < self.cfg.whole_window:
            return [self._document(width - 1, rng)]
        shortest = min(self.cfg.min_doc_len, width)
        documents, remaining = [], width
        while remaining:
            size = int(np.exp(rng.uniform(np.log(shortest), np.log(width))))
            if remaining - size < shortest:   # too little left for another document: take it all
                size = remaining
            documents.append(self._document(size - 1, rng))
            remaining -= size
        return documents

    def _document(self, length: int, rng: np.random.Generator) -> np.ndarray:
        tasks = list(self.cfg.tasks)
        while tasks:
            task = tasks.pop(int(rng.integers(len(tasks))))
            size = None
            if task == "mqar":
                size = int(rng.integers(1, min(MAX_TRAIN_PAIRS, max(1, length // MQAR_TRAIN_PAIR_TOKENS)) + 1))
            elif task == "vartrack":
                size = int(rng.integers(2, 6))
            try:
                instance = generate(task, self.tokenizer, length, rng, TRAIN, self.haystack,
                                    depth=float(rng.random()) if task in DEPTH_TASKS else None, size=size,
                                    text_haystack=bool(rng.random() < self.cfg.text_haystack))
            except InputError:   # too long for this document: try another task
                continue
            return np.append(instance.tokens, self.tokenizer.eos_id).astype(np.int32)
        # Shorter than every task's fixed part: filler, still a whole document.
        return np.append(self.haystack(length, rng), self.tokenizer.eos_id).astype(np.int32)

    def __getitem__(self, index: int) -> Batch:
        documents = self.documents(int(index))
        doc = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
        return window_example(np.concatenate(documents), doc,
                              cross_document_attention=self.cross_document_attention)
