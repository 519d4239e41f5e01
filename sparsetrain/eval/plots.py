"""PNG plots of the results with matplotlib (headless "Agg" backend): one function per figure, each
returning the path it wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_vs_length(results: dict, path: Path) -> Path:
    """Held-out loss against context length (log2 x axis), one line per mode."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for mode, per_length in results["loss"].items():
        lengths = sorted(per_length, key=int)
        ax.plot([int(n) for n in lengths], [per_length[n]["loss"] for n in lengths], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="loss (nats/token)",
           title=f"{results['name']}: loss vs length")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def retrieval_heatmap(results: dict, task: str, path: Path) -> Path:
    """Exact match of one retrieval task, length (rows) x needle depth (columns), one panel per mode."""
    per_mode = results["retrieval"][task]
    modes = list(per_mode)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.5), squeeze=False,
                             layout="constrained")
    for ax, mode in zip(axes[0], modes):
        per_length = per_mode[mode]
        lengths = sorted(per_length, key=int)
        depths = sorted({d for per_depth in per_length.values() for d in per_depth},
                        key=lambda d: -1.0 if d == "-" else float(d.split()[0]))
        grid = np.array([[per_length[n][d]["exact"] if d in per_length[n] else np.nan for d in depths]
                         for n in lengths])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set(xlabel="needle depth", ylabel="length (tokens)", title=f"{task}, {mode}")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact match")
    return _save(fig, path)


def layer_bars(results: dict, path: Path) -> Path:
    """Measured density and recall per sparse layer at the longest evaluated length."""
    length = max(results["layers"], key=int)
    per_layer = results["layers"][length]
    names = [n for n in ("density", "recall") if n in per_layer]
    layers = sorted({layer for n in names for layer in per_layer[n]}, key=int)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.5), layout="constrained")
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar(np.arange(len(layers)) + k * width, [per_layer[name].get(layer, np.nan) for layer in layers],
               width, label=name)
    ax.set_xticks(np.arange(len(layers)) + width * (len(names) - 1) / 2, layers)
    ax.set(xlabel="layer", ylim=(0, 1.05), title=f"sparse layers at length {length}")
    ax.legend()
    return _save(fig, path)


def selected_blocks(results: dict, path: Path) -> Path:
    """The true pooled attention map of one head (grey, darker = more attention, square-root scale) with
    the blocks the layer selected shaded red."""
    view = results["selection_map"]
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    image = ax.imshow(view["scores"], cmap="gray_r", norm=matplotlib.colors.PowerNorm(0.5),
                      interpolation="nearest")
    overlay = np.zeros((*view["selected"].shape, 4))
    overlay[view["selected"]] = (0.9, 0.0, 0.0, 0.45)
    ax.imshow(overlay, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="pooled attention (row-normalised)", shrink=0.8)
    ax.set(xlabel=f"key block ({view['block_size']} tokens)", ylabel="query block",
           title=f"layer {view['layer']}, head {view['head']}, length {view['length']}: selected (red) "
                 f"hold {view['covered']:.0%}")
    return _save(fig, path)


def write_all(results: dict, out_dir: Path) -> list[Path]:
    """Every plot the results support."""
    written = []
    if results["loss"]:
        written.append(loss_vs_length(results, out_dir / "loss_vs_length.png"))
    for task in results["retrieval"]:
        written.append(retrieval_heatmap(results, task, out_dir / f"{task}.png"))
    if results["layers"]:
        written.append(layer_bars(results, out_dir / "layers.png"))
    if results.get("selection_map"):
        written.append(selected_blocks(results, out_dir / "selected_blocks.png"))
    return written
