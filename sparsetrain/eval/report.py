"""The results as Markdown tables (results.md) and a short console summary, and every file of an
evaluation written to its folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparsetrain.eval import plots


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _lengths(section: dict) -> list[str]:
    return sorted({length for per_mode in section.values() for length in per_mode}, key=int)


def loss_table(results: dict) -> list[str]:
    modes = list(results["loss"])
    def cell(mode: str, length: str) -> str:
        value = results["loss"][mode].get(length)
        return f"{value['loss']:.4f} ({value['perplexity']:.2f})" if value else "-"
    rows = [[length, *(cell(m, length) for m in modes)] for length in _lengths(results["loss"])]
    return _table(["length", *(f"{m} loss (ppl)" for m in modes)], rows)


def _depth_key(depth: str) -> float:
    return -1.0 if depth == "-" else float(depth.split()[0])


def retrieval_tables(results: dict) -> list[str]:
    """Per task and mode: exact match per length (rows) and depth (columns), then per length the
    per-token accuracy and answer loss over every depth."""
    out = []
    for task, per_mode in results["retrieval"].items():
        for mode, per_length in per_mode.items():
            depths = sorted({d for per_depth in per_length.values() for d in per_depth}, key=_depth_key)
            rows = []
            for length in sorted(per_length, key=int):
                cells = per_length[length]
                mean = lambda key: np.mean([c[key] for c in cells.values()])   # noqa: E731
                rows.append([length, *(f"{cells[d]['exact']:.0%}" if d in cells else "-" for d in depths),
                             f"{mean('token_accuracy'):.0%}", f"{mean('answer_nll'):.3f}"])
            out += [f"{task}, {mode}: exact match (rows: length, columns: needle depth), per-token "
                    "accuracy and answer loss (nats/token) over all depths", "",
                    *_table(["length", *depths, "per token", "answer loss"], rows)]
    return out


def layers_table(results: dict) -> list[str]:
    if not results["layers"]:
        return []
    length = max(results["layers"], key=int)
    per_layer = results["layers"][length]
    layers = sorted({layer for values in per_layer.values() for layer in values}, key=int)
    names = sorted(per_layer)
    rows = [[layer, *(f"{per_layer[n][layer]:.3f}" if layer in per_layer[n] else "-" for n in names)]
            for layer in layers]
    lines = [f"Per-layer measurements of the sparse layers at length {length}", "",
             *_table(["layer", *names], rows)]
    view = results.get("selection_map")
    if view:
        lines += [f"Selected blocks of layer {view['layer']}, head {view['head']}, on one window of "
                  f"{view['length']} tokens hold {view['covered']:.1%} of the true pooled attention mass "
                  "(selected_blocks.png).", ""]
    return lines


def markdown(results: dict) -> str:
    """results.md: what was evaluated, then one table per measurement."""
    step = f" at step {results['step']}" if results["step"] is not None else ""
    rope = results["rope"]
    lines = [f"# Evaluation of {results['name']}{step}", "", f"Checkpoint: `{results['checkpoint']}`  ",
             f"Attention per layer: {', '.join(results['attention'])}  ",
             f"RoPE: {rope['scaling']} (theta {rope['theta']:g}, factor {rope['factor']:g})  ",
             f"Evaluated with: {' '.join(results['overrides']) or 'the run config as trained'}", ""]
    if results["loss"]:
        lines += ["## Loss against context length", "", f"Windows: {results['loss_windows']}.", "",
                  *loss_table(results)]
    lines += layers_table(results)
    if results["retrieval"]:
        lines += ["## Retrieval", "", *retrieval_tables(results)]
    if results["skipped"]:
        lines += ["## Skipped", "", *(f"- {reason}" for reason in results["skipped"]), ""]
    return "\n".join(lines)


def summary(results: dict) -> str:
    """A few lines for the console: per mode, the loss at the longest length and each retrieval
    task's exact match over every length and depth."""
    lines = []
    modes = [*results["loss"], *(m for per_mode in results["retrieval"].values() for m in per_mode)]
    for mode in dict.fromkeys(modes):
        parts = [mode]
        losses = results["loss"].get(mode, {})
        if losses:
            longest = max(losses, key=int)
            parts.append(f"loss@{longest} {losses[longest]['loss']:.4f}")
        for task, per_mode in results["retrieval"].items():
            cells = [c["exact"] for per_depth in per_mode.get(mode, {}).values() for c in per_depth.values()]
            if cells:
                parts.append(f"{task} {sum(cells) / len(cells):.0%}")
        lines.append("  ".join(parts))
    if results["layers"]:
        length = max(results["layers"], key=int)
        for name, values in results["layers"][length].items():
            shown = " ".join(f"{layer}:{values[layer]:.2f}" for layer in sorted(values, key=int))
            lines.append(f"{name} per layer @{length}: {shown}")
    lines += [f"skipped: {reason}" for reason in results["skipped"]]
    return "\n".join(lines)


def write(results: dict, out: Path) -> list[Path]:
    """The plots, selection_map.npz, results.json and results.md under `out`; returns their paths.
    (Moves the selection map's arrays out of `results` into the .npz.)"""
    out.mkdir(parents=True, exist_ok=True)
    written = plots.write_all(results, out)
    if results.get("selection_map"):
        # The block maps go to an .npz beside the JSON (at 64k tokens they are 1024 x 1024).
        arrays = {key: results["selection_map"].pop(key) for key in ("selected", "scores")}
        np.savez_compressed(out / "selection_map.npz", **arrays)
        written.append(out / "selection_map.npz")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *written]
