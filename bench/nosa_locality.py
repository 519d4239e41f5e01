"""NOSA's locality against InfLLM-V2 on one model (CPU-sized by default).

    PYTHONPATH=. python3 bench/nosa_locality.py [--config configs/nosa_tiny.py] [--init_from RUN]
        [--seq 1024] [--json out.json]

Locality: the share of a query tile's selected key blocks that the previous query tile selected
too (`sparsetrain.sparse.nosa.locality`, the layers' metric "locality"), the blocks a decoder
stepping from one tile to the next finds already on the GPU. Both rows run the same weights on the
same text (the interpreter's standard library as bytes): NOSA as configured, and InfLLM-V2's tile
selection at the same budget, which is NOSA with every non-forced block query-aware
(`query_topk = topk - initial_blocks - local_blocks`: no eviction part). Without `--init_from` the
weights are random (N(0, 0.2); the eviction head's A N(0, 1), since at its initial 0 every block
ties); with it, a trained checkpoint's. Our NOSA selects per query tile, so this measures tile
steps; within a tile consecutive decode steps keep the same blocks under both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import configs
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.checkpoint.params_io import load_params
from sparsetrain.data.tokenizers import ByteTokenizer


def stdlib_tokens(seq: int, batch: int) -> np.ndarray:
    """int32 [batch, seq]: consecutive bytes of the standard library's largest Python files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: -p.stat().st_size)
    text = "".join(p.read_text(errors="replace") for p in files[:batch * 2])
    ids = ByteTokenizer().encode(text)[:batch * seq]
    return ids.reshape(batch, seq)


def random_weights(model: ModelDef, seed: int):
    """N(0, 0.2) matrices, N(0, 1) embedding and key-score scale A, norm scales 1."""
    rng, flat = np.random.default_rng(seed), {}
    for path, leaf in flatten(model.abstract_params()).items():
        shape = tuple(leaf.shape)
        std = 1.0 if path == "embed" or path.endswith("key_score_scale") else 0.2
        flat[path] = np.ones(shape, np.float32) if "norm" in path else (std * rng.standard_normal(shape)).astype(
            np.float32)
    return model.params_from_flat(flat)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/nosa_tiny.py")
    parser.add_argument("--init_from", help="a run directory or checkpoint; default: random weights")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    cfg = configs.load(args.config)
    nosa = [rule for rule in cfg.model.attention if rule.method == "nosa"]
    if not nosa:
        raise SystemExit(f"{args.config}: no nosa rule")
    forced = nosa[0].initial_blocks + nosa[0].local_blocks
    model_cfg = dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, args.seq))
    toks = jnp.asarray(stdlib_tokens(args.seq, args.batch))
    params = None
    results = {}
    for label, query_topk in (("nosa", None), ("infllm_v2 (same budget, all query-aware)", "all")):
        rules = tuple(dataclasses.replace(r, query_topk=r.topk - forced) if r.method == "nosa" and query_topk
                      else r for r in model_cfg.attention)
        model = ModelDef.create(dataclasses.replace(model_cfg, attention=rules))
        if params is None:
            params = model.params_from_flat(flatten(load_params(args.init_from)[0])) if args.init_from \
                else random_weights(model, 0)
        _, _, metrics = jax.jit(model.apply)(params, toks)
        results[label] = {name: float(value) for name, value in metrics.items()
                          if name in ("locality", "locality_query_aware", "density")}
        print(f"{label:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[label].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "seq": args.seq, "results": results}, indent=1))


if __name__ == "__main__":
    main()
