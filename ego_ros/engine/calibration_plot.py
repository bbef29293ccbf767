# SPDX-License-Identifier: Apache-2.0
"""The picture of a layer calibration: each layer's overlap as a bar, the chosen layers highlighted, the chosen
layers' combined overlap, the middle-half default's and chance as lines. matplotlib, without pyplot (no global
backend state: the Agg canvas is attached to the figure itself)."""

from __future__ import annotations

from pathlib import Path

from .calibration import RULES, Calibration

CHOSEN = "#e07b00"
OTHER = "#8da9c4"
CHANCE = "#b02a2a"
COMBINED = "#2a7a2a"
DEFAULT = "#555555"


def plot_calibration(calibration: Calibration, path: Path | str) -> Path:
    """Write the figure to ``path`` (PNG, or any format matplotlib knows by the extension); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    layers = list(range(calibration.num_layers))
    chosen = set(calibration.layers)
    figure = Figure(figsize=(max(6.0, 0.32 * len(layers) + 2.5), 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(layers, calibration.per_layer_overlap, yerr=calibration.per_layer_std, capsize=2,
             color=[CHOSEN if layer in chosen else OTHER for layer in layers], error_kw={"elinewidth": 0.8})
    axes.axhline(calibration.overlap, color=COMBINED, linestyle=":", linewidth=1.5,
                 label=f"chosen layers together: {calibration.overlap:.3f}")
    axes.axhline(calibration.default_overlap, color=DEFAULT, linestyle="-.", linewidth=1.0,
                 label=f"middle half (default): {calibration.default_overlap:.3f}")
    axes.axhline(calibration.chance_overlap, color=CHANCE, linestyle="--", linewidth=1.2,
                 label=f"random tokens: {calibration.chance_overlap:.3f}")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("overlap (R-precision), mean ± std")
    axes.set_xticks(layers if len(layers) <= 32 else layers[::2])
    axes.set_ylim(0.0, 1.3)  # room above the bars for the legend
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    handles, _ = axes.get_legend_handles_labels()
    handles.insert(0, Patch(color=CHOSEN, label=f"chosen, {calibration.rule} rule: {_layers(calibration.layers)}"))
    axes.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    images = f"{calibration.num_images} image{'s' * (calibration.num_images != 1)}"
    axes.set_title(f"Layer calibration of {Path(calibration.model).name or calibration.model}: {images}"
                   + (f" ({calibration.source})" if calibration.source else "")
                   + f"\n{calibration.rule} rule ({RULES[calibration.rule]}), at most {calibration.max_layers} "
                   f"layer{'s' * (calibration.max_layers != 1)}", fontsize=9)
    figure.savefig(path, format=path.suffix.lstrip(".").lower() or "png")
    return path


def _layers(layers) -> str:
    return ",".join(str(layer) for layer in layers)
