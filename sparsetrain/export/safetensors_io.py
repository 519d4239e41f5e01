"""Reading and writing Hugging Face safetensors folders with numpy (no torch).

Every file carries the metadata {"format": "pt"}, which transformers' loaders require. bfloat16
arrays are ml_dtypes.bfloat16 and are stored as safetensors "BF16" (what torch writes and reads).
Above `max_shard_bytes` the tensors are split into `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`, the layout of `save_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in key order; a tensor larger than max_bytes gets a shard of its own."""
    shards, size = [{}], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    return shards


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    save_file(tensors, str(path), metadata=METADATA)
    # safetensors writes through a private temporary file (mode 0600); give the file the mode every
    # other file of the folder gets: 0666 less the umask.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_tensors(tensors: dict[str, np.ndarray], directory: Path, filename: str,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `filename` ("model.safetensors"), sharded with an index above max_shard_bytes; returns
    the files written."""
    directory = Path(directory)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save(tensors, directory / filename)
        return [filename]
    stem = filename.removesuffix(".safetensors")
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _save(shard, directory / name)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (directory / f"{filename}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + [f"{filename}.index.json"]


def read_tensors(directory: Path, filename: str) -> dict[str, np.ndarray]:
    """All tensors of `filename` in `directory`, single-file or sharded (via its index json)."""
    directory = Path(directory)
    index = directory / f"{filename}.index.json"
    if (directory / filename).exists():
        files = [filename]
    elif index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        raise ValueError(f"{directory} has neither {filename} nor {index.name}")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors
