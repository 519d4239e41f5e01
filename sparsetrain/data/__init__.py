"""Data: tokenizers, document sources and the grain pipeline that packs them into training batches."""

from sparsetrain.data.pipeline import (
    Batch,
    Data,
    DataStats,
    PackedWindows,
    TokenStream,
    build_data,
    split_documents,
    tokenize_documents,
)
from sparsetrain.data.sources import find_files, iter_documents, stdlib_files
from sparsetrain.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch", "ByteTokenizer", "Data", "DataStats", "HFTokenizer", "PackedWindows", "TokenStream",
    "Tokenizer", "build_data", "find_files", "iter_documents", "load_tokenizer", "split_documents",
    "stdlib_files", "tokenize_documents",
]
