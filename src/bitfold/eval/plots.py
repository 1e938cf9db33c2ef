"""PNG figures for evaluation results (matplotlib, imported only here and only when plotting).

Figures are built with matplotlib's object API (`Figure`, no pyplot), so plotting neither
needs a display nor changes the backend of a program that imports bitfold.
"""
from __future__ import annotations

import math

from bitfold.errors import BitfoldError


def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BitfoldError("plots need matplotlib: pip install matplotlib (or pip install 'bitfold[eval]'), "
                           "or pass --no-plot") from None
    return Figure(**kw)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else (f"{n / 1024:.1f}k" if n >= 1024 else str(n))


def _heatmap(ax, grid: list[list[float]], lengths: list[int], depths: list[float], title: str):
    """x: context length, y: needle depth (top = start of the haystack); colour: accuracy."""
    data = [[grid[i][j] for i in range(len(lengths))] for j in range(len(depths))]  # [depth][length]
    im = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    for j, row in enumerate(data):
        for i, v in enumerate(row):
            if not math.isnan(v):
                ax.text(i, j, f"{v:.0%}", ha="center", va="center", fontsize=9, color="black")
    return im


def needle_heatmap(grid: list[list[float]], lengths: list[int], depths: list[float], title: str, path: str) -> str:
    fig = _figure(figsize=(max(4.5, 1.8 + 0.9 * len(lengths)), 1.6 + 0.5 * len(depths)), layout="constrained")
    ax = fig.subplots()
    im = _heatmap(ax, grid, lengths, depths, title)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.savefig(path, dpi=120)
    return path


def needle_compare(grids: dict[str, list[list[float]]], lengths: list[int], depths: list[float], title: str,
                   path: str) -> str:
    """The configurations' heatmaps side by side, one colour scale."""
    n = len(grids)
    fig = _figure(figsize=(max(5.0, 0.8 + n * (1.6 + 0.9 * len(lengths))), 1.9 + 0.5 * len(depths)),
                  layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, grid) in zip(axes, grids.items()):
        mean = [v for row in grid for v in row if not math.isnan(v)]
        im = _heatmap(ax, grid, lengths, depths, f"{name} (mean {sum(mean) / max(1, len(mean)):.0%})")
    fig.colorbar(im, ax=list(axes), label="retrieval accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def _binned(values: list[float], counts: list[float], bins: int) -> tuple[list[float], list[float]]:
    """Count-weighted means of `values` over about `bins` equal position ranges (unscored
    positions, count 0, are skipped)."""
    n = len(values)
    width = max(1, math.ceil(n / bins))
    xs, ys = [], []
    for a in range(0, n, width):
        w = counts[a:a + width]
        tot = sum(w)
        if tot:
            xs.append(a + (min(n, a + width) - a - 1) / 2)
            ys.append(sum(v * c for v, c in zip(values[a:a + width], w)) / tot)
    return xs, ys


def ppl_positions(curves: dict[str, dict[str, list[float]]], counts: list[float], title: str, path: str,
                  bins: int = 32) -> str:
    """Mean NLL per target position for every configuration, and mean KL against the reference
    for every other one: where in the context a compressed cache starts to cost quality."""
    names = list(curves)
    fig = _figure(figsize=(10, 4), layout="constrained")
    ax_nll, ax_kl = fig.subplots(1, 2)
    for i, name in enumerate(names):  # one colour per configuration in both panels
        ax_nll.plot(*_binned(curves[name]["nll"], counts, bins), marker=".", color=f"C{i}",
                    label=name + (" (ref)" if i == 0 else ""))
        if i:
            ax_kl.plot(*_binned(curves[name]["kl"], counts, bins), marker=".", color=f"C{i}", label=name)
    ax_nll.set(xlabel="token position", ylabel="mean NLL (nats)", title="negative log-likelihood")
    ax_kl.set(xlabel="token position", ylabel=f"mean KL vs {names[0]} (nats)", title="KL divergence")
    ax_nll.legend()
    if len(names) > 1:
        ax_kl.legend()
        ax_kl.set_yscale("symlog", linthresh=1e-6)  # KL >= 0; linear near 0 so an exact 0 shows
        ax_kl.set_ylim(bottom=0)
    else:
        ax_kl.text(0.5, 0.5, "one configuration: no KL", ha="center", va="center", transform=ax_kl.transAxes)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path
