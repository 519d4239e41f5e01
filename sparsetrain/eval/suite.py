"""The evaluation suite: every measurement as one job, run in order under a progress bar.

Results (a JSON-ready dict; lengths, depths and sizes are string keys):

    loss[mode][length]           {"loss", "perplexity", "windows", "tokens"}: mean next-token loss
                                 over the held-out documents packed into windows of `length` as
                                 training packs them with masked documents: each document attends
                                 only to itself and its positions restart (segment ids), so no
                                 window measures context across documents ("loss_windows" says so)
    layers[length]               {"density": {layer: v}, "recall": {layer: v}} measured in the sparse
                                 mode on those windows (recall: share of the true attention mass the
                                 selected blocks hold)
    retrieval[task][mode][length][depth]
                                 {"exact", "token_accuracy", "answer_nll", "answers", "size"}: means
                                 over the answers of `samples` probes of exactly `length` tokens
                                 (depth "-" for tasks without a needle depth; size: MQAR pairs,
                                 vartrack hops, copy characters, or NIAH needles)
    selection_map                for the first sparse layer, head 0, the first window of the longest
                                 length: {"layer", "head", "length", "block_size", "covered" (share
                                 of the true map's mass on selected blocks), "selected" bool [nQ, nK]
                                 and "scores" f32 [nQ, nK] (numpy arrays, saved beside the JSON)}
    skipped                      what could not run, and why

The probes come from `sparsetrain.data.retrieval_tasks` with the evaluation lexicon: the same task
templates as the training mix (data.retrieval), never its seeds, filler sentences or keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from tqdm import tqdm

from sparsetrain.config import EVAL_TASKS, EvalSuiteConfig
from sparsetrain.configbase import to_dict
from sparsetrain.data.pipeline import PackedWindows, TokenStream
from sparsetrain.data.retrieval_tasks import DEPTH_TASKS, EVAL, NIAH_NEEDLES, Haystack, Instance, generate, mqar_pairs_for
from sparsetrain.errors import InputError
from sparsetrain.eval.measure import MODES, Runner, Subject, held_out
from sparsetrain.eval.probes import score_answers
from sparsetrain.eval.selection_map import first_sparse_layer, selection_map

TASKS = EVAL_TASKS                                 # "loss" and the retrieval tasks
RETRIEVAL = tuple(t for t in TASKS if t != "loss")
# Tokens per forward call when several windows of one length are batched (bounds logits memory).
BATCH_TOKENS = 16384
# Needle tasks other than passkey hide their needles in held-out text (RULER's essay haystack);
# passkey keeps its classic noise of repeated sentences.
TEXT_HAYSTACK_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vartrack")
LOSS_WINDOWS = "held-out documents packed as in training, each attending only to itself (segment ids, positions restart)"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    lengths: tuple[int, ...]                       # context lengths for every task
    modes: tuple[str, ...] = MODES                 # "sparse" (as configured) and/or "dense"
    tasks: tuple[str, ...] = TASKS
    loss_tokens: int = 32768                       # held-out tokens per length (at least one window)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4                               # probes per task x length x depth
    mqar_pairs: tuple[int, ...] = ()               # pairs per MQAR probe; () = length // 32 at each length
    seed: int = 0

    def validate(self) -> None:
        for name in ("modes", "tasks"):
            allowed = MODES if name == "modes" else TASKS
            bad = sorted(set(getattr(self, name)) - set(allowed))
            if bad or not getattr(self, name):
                raise InputError(f"--{name} {','.join(getattr(self, name))}: choose from {','.join(allowed)}")
        if not self.lengths or min(self.lengths) < 2:
            raise InputError(f"lengths {self.lengths}: need at least one length >= 2")
        for name in ("loss_tokens", "samples"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} {getattr(self, name)}: must be >= 1")
        if not all(0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise InputError(f"--depths {self.depths}: give one or more depths in [0, 1]")
        if any(p < 1 for p in self.mqar_pairs):
            raise InputError(f"--mqar_pairs {self.mqar_pairs}: must be >= 1")


def powers_of_two(min_len: int, max_len: int) -> tuple[int, ...]:
    """min_len, 2·min_len, ... up to max_len (min_len itself need not be a power of two)."""
    if not 2 <= min_len <= max_len:
        raise InputError(f"--min_len {min_len} and --max_len {max_len}: need 2 <= min_len <= max_len")
    return tuple(min_len * 2 ** i for i in range(int(math.log2(max_len / min_len)) + 1))


def default_lengths(min_len: int | None, max_len: int | None, trained_len: int) -> tuple[int, ...]:
    """The command's lengths: powers of two from min_len (default trained_len / 4) to max_len
    (default 4 x trained_len), trained_len being the sequence length the weights were trained at
    (data.seq_len of the checkpoint's phase): below it, above it and at it."""
    max_len = max_len or 4 * trained_len
    return powers_of_two(min_len or max(2, min(trained_len // 4, max_len)), max_len)


def options_for(suite: EvalSuiteConfig, trained_len: int) -> EvalOptions:
    """The options of the trainer's suite (`trainer.eval_suite`): its set fields, the command's
    defaults for the rest."""
    given = {name: getattr(suite, name) for name in ("modes", "tasks", "loss_tokens", "depths", "samples",
                                                     "mqar_pairs") if getattr(suite, name)}
    return EvalOptions(lengths=default_lengths(suite.min_len, suite.max_len, trained_len), **given)


def _forward_probes(runner: Runner, probes: list[Instance]) -> list[list]:
    """Per probe, the scores of its answers; probes of one length share forward passes of at most
    BATCH_TOKENS tokens."""
    length = len(probes[0].tokens)
    if any(len(p.tokens) != length for p in probes):
        return [c for p in probes for c in _forward_probes(runner, [p])]
    batch, out = max(1, BATCH_TOKENS // length), []
    for first in range(0, len(probes), batch):
        group = probes[first:first + batch]
        nll, predicted, _ = runner(np.stack([p.tokens for p in group]))
        out += [score_answers(p, row, losses) for p, row, losses in zip(group, predicted, nll)]
    return out


def _summarise(scores: list, size: int | None) -> dict:
    answers = [a for row in scores for a in row]
    return {"exact": float(np.mean([a.exact for a in answers])),
            "token_accuracy": float(np.mean([a.token_accuracy for a in answers])),
            "answer_nll": float(np.mean([a.nll for a in answers])), "answers": len(answers), "size": size}


def _loss_job(runner: Runner, stream: TokenStream, pad_id: int, length: int, options: EvalOptions):
    windows = PackedWindows(stream, length, pad_id)
    count = min(max(1, options.loss_tokens // length), windows.num_filled)
    if count == 0:
        return None, f"loss at {length}: the held-out documents are empty"
    batch = max(1, BATCH_TOKENS // length)
    total, trained, metrics = 0.0, 0.0, []
    for first in range(0, count, batch):
        rows = [windows[i] for i in range(first, min(first + batch, count))]
        field = lambda name: np.stack([r[name] for r in rows])   # noqa: E731
        nll, _, reported = runner(field("inputs"), targets=field("targets"), segment_ids=field("segment_ids"),
                                  positions=field("positions"))
        mask = field("loss_mask")
        total += float((nll * mask).sum())
        trained += float(mask.sum())
        metrics.append((len(rows), reported))
    loss = total / trained
    mean = {k: sum(n * m[k] for n, m in metrics) / count for k in metrics[0][1]}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "windows": count, "tokens": int(trained),
            "metrics": mean}, None


def _per_layer(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"density/0": v, ...} -> {"density": {"0": v, ...}, ...} (overall means dropped)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, _, layer = key.partition("/")
        if layer.isdigit():
            out.setdefault(name, {})[layer] = value
    return out


def _sizes(task: str, length: int, options: EvalOptions) -> list[int | None]:
    if task == "mqar":
        return list(options.mqar_pairs) or [mqar_pairs_for(length)]
    return [None]


def _size_of(task: str, probe: Instance) -> int | None:
    info = probe.info
    return {"mqar": info.get("pairs"), "vartrack": len(info.get("names", ())), "copy": info.get("chars"),
            "niah_multikey": NIAH_NEEDLES, "niah_multivalue": NIAH_NEEDLES}.get(task)


def _retrieval_jobs(task: str, runner: Runner, mode: str, options: EvalOptions, haystack: Haystack,
                    tokenizer) -> list[tuple[str, Callable]]:
    jobs = []
    depths = options.depths if task in DEPTH_TASKS else (None,)
    for length in options.lengths:
        for size in _sizes(task, length, options):
            for depth in depths:
                def job(length=length, size=size, depth=depth):
                    key = "-" if depth is None else str(depth)
                    try:
                        probes = [generate(task, tokenizer, length, EVAL.rng(options.seed, i, length, TASKS.index(task)),
                                           EVAL, haystack, depth=depth, size=size,
                                           text_haystack=task in TEXT_HAYSTACK_TASKS)
                                  for i in range(options.samples)]
                    except InputError as e:
                        return None, str(e)
                    value = _summarise(_forward_probes(runner, probes), _size_of(task, probes[0]))
                    path = ("retrieval", task, mode, str(length), key)
                    if size is not None and len(_sizes(task, length, options)) > 1:
                        path = ("retrieval", task, mode, str(length), f"{size} pairs")
                    return path, value
                label = f" depth {depth}" if depth is not None else ""
                jobs.append((f"{mode} {task} @{length}{label}", job))
    return jobs


def _jobs(subject: Subject, options: EvalOptions, runners: dict[str, Runner]) -> list[tuple[str, Callable]]:
    """(description, job) pairs; a job returns (path in the results, value) or (None, skip reason)."""
    jobs = []
    tok = subject.tokenizer
    stream = held_out(subject)
    text = np.asarray(stream.tokens[stream.tokens != tok.eos_id], np.int32)
    haystack = Haystack(tok, EVAL, text)
    for mode, runner in runners.items():
        for length in options.lengths if "loss" in options.tasks else ():
            def loss(mode=mode, runner=runner, length=length):
                value, skipped = _loss_job(runner, stream, tok.pad_id, length, options)
                return (("loss", mode, str(length)), value) if value else (None, skipped)
            jobs.append((f"{mode} loss @{length}", loss))
        for task in RETRIEVAL:
            if task in options.tasks:
                jobs += _retrieval_jobs(task, runner, mode, options, haystack, tok)
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
               "trained_len": subject.cfg.data.seq_len,
               "options": to_dict(dataclasses.replace(options, modes=modes)),
               "loss_windows": LOSS_WINDOWS,
               "loss": {}, "layers": {}, "retrieval": {}, "skipped": []}
    bar = tqdm(_jobs(subject, options, runners), desc="eval", unit="job", disable=not progress)
    for description, job in bar:
        bar.set_postfix_str(description)
        path, value = job()
        if path is None:
            if value not in results["skipped"]:   # e.g. a too-short length, once for all depths and modes
                results["skipped"].append(value)
            continue
        if path[0] == "loss":
            metrics = value.pop("metrics")
            if path[1] == "sparse":
                results["layers"][path[2]] = _per_layer(metrics)
        _put(results, path, value)
    return results
