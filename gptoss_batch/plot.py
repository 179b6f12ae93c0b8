"""The sweep's picture: throughput and p95 latency against concurrency (or arrival rate) on one figure,
knee marked. matplotlib is an optional extra, imported only here and only when a picture is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOT_HINT = "pip install 'gptoss-batch[plot]'"
FIGSIZE_IN = (9.0, 5.0)
DPI = 120
THROUGHPUT_COLOR = "#1f77b4"
LATENCY_COLOR = "#d62728"
KNEE_COLOR = "#2ca02c"


class PlotUnavailable(ImportError):
    """matplotlib is not installed; the message says how to get it."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"matplotlib is not installed; {PLOT_HINT} to get the picture") from None
    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def write_sweep_png(path: str | Path, *, levels: Sequence[float], throughput: Sequence[float],
                    latency_p95_s: Sequence[float | None], failed: Sequence[bool], knee: float | None,
                    x_label: str, title: str) -> None:
    """Throughput (successful requests/s, left axis) and p95 latency (seconds, right axis) against the
    levels on a log2 x axis; levels with failed requests drawn hollow; the knee as a dashed line."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=FIGSIZE_IN, dpi=DPI)
    try:
        ax.set_xscale("log", base=2)
        ax.plot(levels, throughput, "-", color=THROUGHPUT_COLOR, linewidth=2, label="throughput (ok req/s)")
        for x, y, bad in zip(levels, throughput, failed, strict=True):
            ax.plot([x], [y], "o", color=THROUGHPUT_COLOR, markersize=7,
                    markerfacecolor="white" if bad else THROUGHPUT_COLOR)
        ax.set_xlabel(x_label)
        ax.set_ylabel("throughput (successful requests/s)", color=THROUGHPUT_COLOR)
        ax.tick_params(axis="y", labelcolor=THROUGHPUT_COLOR)
        ax.set_ylim(bottom=0, top=max([*throughput, 0.0]) * 1.15 or 1.0)
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_major_locator(FixedLocator(list(levels)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:g}" for x in levels])

        ax2 = ax.twinx()
        pts = [(x, y) for x, y in zip(levels, latency_p95_s, strict=True) if y is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color=LATENCY_COLOR, linewidth=1.5,
                 markersize=6, label="p95 latency (s)")
        ax2.set_ylabel("p95 latency (s)", color=LATENCY_COLOR)
        ax2.tick_params(axis="y", labelcolor=LATENCY_COLOR)
        ax2.set_ylim(bottom=0, top=max([p[1] for p in pts] + [0.0]) * 1.15 or 1.0)

        # Proxy artists: one clean legend for both axes, whatever was drawn point by point.
        handles = [Line2D([], [], color=THROUGHPUT_COLOR, marker="o", linewidth=2, label="throughput (ok req/s)"),
                   Line2D([], [], color=LATENCY_COLOR, marker="s", linestyle="--", label="p95 latency (s)")]
        if knee is not None:
            ax.axvline(knee, color=KNEE_COLOR, linestyle=":", linewidth=2)
            handles.append(Line2D([], [], color=KNEE_COLOR, linestyle=":", linewidth=2, label=f"knee: {knee:g}"))
            if knee in levels:
                i = list(levels).index(knee)
                ax.annotate(f"knee {knee:g}\n{throughput[i]:.2f} req/s", (knee, throughput[i]),
                            textcoords="offset points", xytext=(8, -34), color=KNEE_COLOR, fontweight="bold")
        if any(failed):
            handles.append(Line2D([], [], color=THROUGHPUT_COLOR, marker="o", markerfacecolor="white",
                                  linestyle="none", label="level with failed requests"))
        ax.legend(handles=handles, loc="upper left", fontsize=9, framealpha=0.9)
        ax.set_title(title, fontsize=11)
        fig.tight_layout()
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(target)
    finally:
        plt.close(fig)
