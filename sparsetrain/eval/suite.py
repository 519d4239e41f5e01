"""The evaluation suite: every measurement as one job, run in order under a progress bar.

Results (a JSON-ready dict; lengths, depths and pair counts are string keys):

    loss[mode][length]           {"loss", "perplexity", "windows"}: mean next-token loss over
                                 consecutive windows of the held-out text, positions 0..length-1
    layers[length]               {"density": {layer: v}, "recall": {layer: v}} measured in the sparse
                                 mode on those windows (recall: share of the true attention mass the
                                 selected blocks hold)
    passkey[mode][length][depth] exact-match accuracy over the samples
    mqar[mode][pairs]            {"accuracy" (per query), "length" (tokens)}
    selection_map                for the first sparse layer, head 0, the first window of the longest
                                 length: {"layer", "head", "length", "block_size", "covered" (share
                                 of the true map's mass on selected blocks), "selected" bool [nQ, nK]
                                 and "scores" f32 [nQ, nK] (numpy arrays, saved beside the JSON)}
    skipped                      what could not run, and why
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from tqdm import tqdm

from sparsetrain.config import EvalSuiteConfig
from sparsetrain.configbase import to_dict
from sparsetrain.errors import InputError
from sparsetrain.eval.measure import MODES, Runner, Subject, held_out_tokens
from sparsetrain.eval.probes import Probe, answers_correct, mqar, passkey
from sparsetrain.eval.selection_map import first_sparse_layer, selection_map

TASKS = ("loss", "passkey", "mqar")
# Tokens per forward call when several windows of one length are batched (bounds logits memory).
BATCH_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    lengths: tuple[int, ...]                       # context lengths for loss and passkey
    modes: tuple[str, ...] = MODES                 # "sparse" (as configured) and/or "dense"
    tasks: tuple[str, ...] = TASKS
    loss_tokens: int = 32768                       # held-out tokens per length (at least one window)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 4                       # probes per length x depth
    mqar_pairs: tuple[int, ...] = (8, 32, 128)     # key-value pairs per MQAR probe
    mqar_samples: int = 4
    seed: int = 0

    def validate(self) -> None:
        for name in ("modes", "tasks"):
            allowed = MODES if name == "modes" else TASKS
            bad = sorted(set(getattr(self, name)) - set(allowed))
            if bad or not getattr(self, name):
                raise InputError(f"--{name} {','.join(getattr(self, name))}: choose from {','.join(allowed)}")
        if not self.lengths or min(self.lengths) < 2:
            raise InputError(f"lengths {self.lengths}: need at least one length >= 2")
        for name in ("loss_tokens", "passkey_samples", "mqar_samples"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} {getattr(self, name)}: must be >= 1")


def powers_of_two(min_len: int, max_len: int) -> tuple[int, ...]:
    """min_len, 2·min_len, ... up to max_len (min_len itself need not be a power of two)."""
    if not 2 <= min_len <= max_len:
        raise InputError(f"--min_len {min_len} and --max_len {max_len}: need 2 <= min_len <= max_len")
    return tuple(min_len * 2 ** i for i in range(int(math.log2(max_len / min_len)) + 1))


def default_lengths(min_len: int | None, max_len: int | None, max_seq_len: int) -> tuple[int, ...]:
    """The command's lengths: powers of two from min_len (default 1024, or max_len if less) to
    max_len (default the model's max_seq_len)."""
    max_len = max_len or max_seq_len
    return powers_of_two(min_len or min(1024, max_len), max_len)


def options_for(suite: EvalSuiteConfig, max_seq_len: int) -> EvalOptions:
    """The options of the trainer's suite (`trainer.eval_suite`): its set fields, the command's
    defaults for the rest."""
    given = {name: getattr(suite, name) for name in ("modes", "tasks", "loss_tokens", "depths", "passkey_samples",
                                                     "mqar_pairs", "mqar_samples") if getattr(suite, name)}
    return EvalOptions(lengths=default_lengths(suite.min_len, suite.max_len, max_seq_len), **given)


def _predict(runner: Runner, probes: list[Probe]) -> list[list[bool]]:
    """Per probe, exact match per answer; probes of one length share forward passes of at most
    BATCH_TOKENS tokens."""
    length = len(probes[0].tokens)
    if any(len(p.tokens) != length for p in probes):
        return [c for p in probes for c in _predict(runner, [p])]
    batch, out = max(1, BATCH_TOKENS // length), []
    for first in range(0, len(probes), batch):
        group = probes[first:first + batch]
        _, predicted, _ = runner(np.stack([p.tokens for p in group]))
        out += [answers_correct(p, row) for p, row in zip(group, predicted)]
    return out


def _loss_job(runner: Runner, text: np.ndarray, length: int, options: EvalOptions):
    windows = min(max(1, options.loss_tokens // length), len(text) // length)
    if windows == 0:
        return None, f"loss at {length}: the held-out text has only {len(text)} tokens"
    batch = max(1, BATCH_TOKENS // length)
    losses, metrics = [], []
    for first in range(0, windows, batch):
        count = min(batch, windows - first)
        nll, _, reported = runner(text[first * length:(first + count) * length].reshape(count, length))
        losses.append(nll.sum(axis=1))
        metrics.append((count, reported))
    loss = float(np.concatenate(losses).sum() / (windows * (length - 1)))
    mean = {k: sum(n * m[k] for n, m in metrics) / windows for k in metrics[0][1]}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "windows": windows, "metrics": mean}, None


def _per_layer(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"density/0": v, ...} -> {"density": {"0": v, ...}, ...} (overall means dropped)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, _, layer = key.partition("/")
        if layer.isdigit():
            out.setdefault(name, {})[layer] = value
    return out


def _jobs(subject: Subject, options: EvalOptions, runners: dict[str, Runner]) -> list[tuple[str, Callable]]:
    """(description, job) pairs; a job returns (path in the results, value) or (None, skip reason)."""
    jobs = []
    text = held_out_tokens(subject) if "loss" in options.tasks else None
    tok, seed = subject.tokenizer, options.seed
    for mode, runner in runners.items():
        for length in options.lengths if "loss" in options.tasks else ():
            def loss(mode=mode, runner=runner, length=length):
                value, skipped = _loss_job(runner, text, length, options)
                return (("loss", mode, str(length)), value) if value else (None, skipped)
            jobs.append((f"{mode} loss @{length}", loss))
        for length in options.lengths if "passkey" in options.tasks else ():
            for depth in options.depths:
                def find(runner=runner, length=length, depth=depth, mode=mode):
                    try:
                        probes = [passkey(tok, length, depth, seed=seed, sample=i)
                                  for i in range(options.passkey_samples)]
                    except InputError as e:
                        return None, str(e)
                    correct = [c[0] for c in _predict(runner, probes)]
                    return ("passkey", mode, str(length), str(depth)), float(np.mean(correct))
                jobs.append((f"{mode} passkey @{length} depth {depth}", find))
        for pairs in options.mqar_pairs if "mqar" in options.tasks else ():
            def recall(runner=runner, pairs=pairs, mode=mode):
                probes = [mqar(tok, pairs, seed=seed, sample=i) for i in range(options.mqar_samples)]
                correct = [c for row in _predict(runner, probes) for c in row]
                value = {"accuracy": float(np.mean(correct)), "length": int(max(len(p.tokens) for p in probes))}
                return ("mqar", mode, str(pairs)), value
            jobs.append((f"{mode} mqar {pairs} pairs", recall))
    sparse = runners.get("sparse")
    layer = first_sparse_layer(sparse) if sparse else None
    if layer is not None and "loss" in options.tasks and not subject.cfg.model.scan_layers:
        def blocks(length=max(options.lengths)):
            if len(text) < length:
                return None, f"selection map at {length}: the held-out text has only {len(text)} tokens"
            value = selection_map(sparse, text[:length], layer)
            return ("selection_map",), {"layer": layer, "head": 0, "length": length, **value}
        jobs.append((f"sparse selection map, layer {layer}", blocks))
    return jobs


def _put(results: dict, path: tuple[str, ...], value) -> None:
    node = results
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def evaluate(subject: Subject, options: EvalOptions, *, progress: bool = True) -> dict:
    """Run every requested measurement; returns the results dict described in the module docstring."""
    options.validate()
    # A model without sparse layers is its own dense baseline.
    modes = options.modes if subject.is_sparse else ("dense",)
    runners = {mode: Runner(subject, mode) for mode in modes}
    results = {"checkpoint": subject.path, "name": subject.cfg.name, "step": subject.step,
               "attention": [spec.method for spec in subject.cfg.model.layer_specs],
               "rope": to_dict(subject.cfg.model.rope),
               "overrides": list(subject.overrides),
               "options": to_dict(dataclasses.replace(options, modes=modes)),
               "loss": {}, "layers": {}, "passkey": {}, "mqar": {}, "skipped": []}
    bar = tqdm(_jobs(subject, options, runners), desc="eval", unit="job", disable=not progress)
    for description, job in bar:
        bar.set_postfix_str(description)
        path, value = job()
        if path is None:
            if value not in results["skipped"]:   # e.g. a too-short passkey length, once for all depths
                results["skipped"].append(value)
            continue
        if path[0] == "loss":
            metrics = value.pop("metrics")
            if path[1] == "sparse":
                results["layers"][path[2]] = _per_layer(metrics)
        _put(results, path, value)
    return results
