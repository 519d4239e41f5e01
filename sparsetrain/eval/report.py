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


def passkey_tables(results: dict) -> list[str]:
    out = []
    for mode, per_length in results["passkey"].items():
        depths = sorted({d for per_depth in per_length.values() for d in per_depth}, key=float)
        rows = [[length, *(f"{per_length[length][d]:.0%}" if d in per_length[length] else "-" for d in depths)]
                for length in sorted(per_length, key=int)]
        out += [f"Passkey accuracy, {mode} (rows: length, columns: depth)", "",
                *_table(["length", *depths], rows)]
    return out


def mqar_table(results: dict) -> list[str]:
    modes = list(results["mqar"])
    pairs = sorted({p for per_mode in results["mqar"].values() for p in per_mode}, key=int)
    rows = [[p, str(next(results["mqar"][m][p]["length"] for m in modes if p in results["mqar"][m])),
             *(f"{results['mqar'][m][p]['accuracy']:.0%}" if p in results["mqar"][m] else "-" for m in modes)]
            for p in pairs]
    return _table(["pairs", "tokens", *(f"{m} accuracy" for m in modes)], rows)


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
        lines += ["## Loss against context length", "", *loss_table(results)]
    lines += layers_table(results)
    if results["passkey"]:
        lines += ["## Passkey retrieval", "", *passkey_tables(results)]
    if results["mqar"]:
        lines += ["## Multi-query associative recall", "", *mqar_table(results)]
    if results["skipped"]:
        lines += ["## Skipped", "", *(f"- {reason}" for reason in results["skipped"]), ""]
    return "\n".join(lines)


def summary(results: dict) -> str:
    """A few lines for the console: loss at the longest length, mean passkey and MQAR accuracy per mode."""
    lines = []
    for mode in dict.fromkeys([*results["loss"], *results["passkey"], *results["mqar"]]):
        parts = [mode]
        losses = results["loss"].get(mode, {})
        if losses:
            longest = max(losses, key=int)
            parts.append(f"loss@{longest} {losses[longest]['loss']:.4f}")
        cells = [v for per_depth in results["passkey"].get(mode, {}).values() for v in per_depth.values()]
        if cells:
            parts.append(f"passkey {sum(cells) / len(cells):.0%}")
        mqar = results["mqar"].get(mode, {})
        if mqar:
            parts.append(f"mqar {sum(v['accuracy'] for v in mqar.values()) / len(mqar):.0%}")
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
