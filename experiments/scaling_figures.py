"""The scaling experiment's figure: per-kind λ_max and trace against width, depth and data, per family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from repro_scaling import AXES, KINDS, ScalingResult
from scaling_families import FAMILIES

COLORS = {
    "query": "tab:red",
    "key": "tab:orange",
    "value": "tab:blue",
    "attn_out": "tab:cyan",
    "norm": "tab:olive",
    "ffn_in": "tab:green",
    "ffn_out": "tab:purple",
    "all": "k",
}
LABELS = {
    "query": "query",
    "key": "key",
    "value": "value",
    "attn_out": "attention out",
    "norm": "LayerNorms",
    "ffn_in": "FFN in",
    "ffn_out": "FFN out",
    "all": "all layer blocks",
}
STAT_NAMES = {"top": "λ_max", "trace": "trace"}


def figure_name(family: str) -> str:
    return f"repro_scaling_{family}.png"


def _axis_label(family: str, axis: str) -> str:
    return {"width": "width d", "depth": "depth (layers)", "data": FAMILIES[family].size_unit}[axis]


def plot(result: ScalingResult, family: str, path: str | Path) -> None:
    """Rows: λ_max at initialisation, λ_max trained, trace trained, trace at initialisation; columns: width,
    depth, data. One line per block kind (over layers: largest λ_max, summed trace), the mean over seeds with
    the seeds' range as error bars; log-log (the traces on a symmetric log axis: they can be negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [("init", "top"), ("trained", "top"), ("trained", "trace"), ("init", "trace")]
    fig, axes = plt.subplots(len(rows), len(AXES), figsize=(14, 15), squeeze=False)
    for (state, stat), row in zip(rows, axes):
        for axis, ax in zip(AXES, row):
            lowest, largest = np.inf, 0.0
            for kind in (*KINDS, "all"):
                x, values = result.series(family, axis, state, kind, stat)
                mean = values.mean(0)
                err = np.stack([mean - values.min(0), values.max(0) - mean])
                style = {"lw": 2.2, "ls": "--"} if kind == "all" else {"lw": 1.4}
                ax.errorbar(
                    x,
                    mean,
                    yerr=err,
                    color=COLORS[kind],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=LABELS[kind],
                    **style,
                )
                lowest = min(lowest, float(np.abs(values[values != 0]).min(initial=np.inf)))
                largest = max(largest, float(np.abs(values).max()))
            ax.set_xscale("log")
            if stat == "top":
                ax.set_yscale("log")
            else:
                # linear only near 0, at most 3 decades below the largest |trace|: a readable axis
                ax.set_yscale("symlog", linthresh=max(lowest, 1e-3 * largest, 1e-12), linscale=0.5)
                ax.axhline(0, color="0.6", lw=0.6)
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured sizes
            ax.set_xlabel(_axis_label(family, axis), fontsize=9)
            ax.set_ylabel(
                f"{STAT_NAMES[stat]}, {'initialisation' if state == 'init' else 'trained'}", fontsize=9
            )
            ax.grid(True, which="major", alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="block kind")
    seeds = len(result.grid.seeds)
    fig.suptitle(
        f"{FAMILIES[family].title}: per-kind curvature against width, depth and training-set size "
        f"(mean over {seeds} seeds, bars: range; {result.grid.steps} AdamW steps)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
