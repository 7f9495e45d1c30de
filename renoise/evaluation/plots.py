"""Plots of `renoise eval` as PNG files (matplotlib, imported only here; not a dependency of renoise).

    psnr_vs_calls.png    median PSNR (p10–p90 bars) against UNet calls per image, one point per method
    latent_psnr_vs_calls.png  the latent PSNR (z0 of the reconstruction against the encoded image) the same way
    psnr_vs_cost.png     the same against the inversion's cost in call-equivalents (CFG evaluations
                         counted twice, backward passes at their measured cost)
    psnr_vs_seconds.png  the same against the inversion's seconds per image
    residuals.png        per method: the median fixed-point residual against iteration, one curve per
                         inversion step (coloured by timestep), log scale
    contraction.png      per method: the median contraction estimate (ratio of the last two residuals
                         of a step) against the step's timestep, where the inversion reports it
    grid.png             the first images: input | reconstruction | edit (| blend mask, with an editing
                         mode that has one), for each method

`plot_all` returns the files written, or a note saying why there are none (no matplotlib).
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

__all__ = ["plot_all", "MISSING_NOTE"]

MISSING_NOTE = ("plots skipped: matplotlib is not installed (pip install matplotlib, or renoise[test]); "
                "the rows and summaries are complete without them")


def plot_all(out, summary: dict, rows: dict, methods: list[str], grid_ids: list[str]):
    """Write the plots under out/plots; returns (files, note)."""
    if importlib.util.find_spec("matplotlib") is None:
        return [], MISSING_NOTE
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import store
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    cost = ("cost_invert", "cost per image (inversion): UNet evaluations + backward passes, call-equivalents")
    secs = ("seconds_invert", "seconds per image (inversion, median)")
    for name, draw in (("psnr_vs_calls.png", lambda: _psnr_vs_calls(plt, summary)),
                       ("latent_psnr_vs_calls.png", lambda: _psnr_vs_calls(plt, summary, metric="latent_psnr")),
                       ("psnr_vs_cost.png", lambda: _psnr_vs_calls(plt, summary, *cost)),
                       ("psnr_vs_seconds.png", lambda: _psnr_vs_calls(plt, summary, *secs)),
                       ("residuals.png", lambda: _residuals(plt, rows, methods)),
                       ("contraction.png", lambda: _contraction(plt, rows, methods)),
                       ("grid.png", lambda: _grid(plt, Path(out), methods, grid_ids))):
        fig = draw()
        if fig is None:
            continue
        tmp = folder / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        store.write_atomic(folder / name, tmp.read_bytes())
        tmp.unlink()
        written.append(f"plots/{name}")
    return written, None


def _psnr_vs_calls(plt, summary, key="calls_invert", label="model calls per image (inversion)", metric="psnr"):
    points = [(n, m["metrics"][key], m["metrics"][metric]) for n, m in summary["methods"].items()
              if metric in m["metrics"] and key in m["metrics"]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, calls, psnr) in enumerate(points):
        x, y = calls["median"], psnr["median"]
        ax.errorbar(x, y, yerr=[[y - psnr["p10"]], [psnr["p90"] - y]], fmt="o", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * (i % 3)), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel(f"reconstruction {'latent ' if metric == 'latent_psnr' else ''}PSNR (dB), median, p10–p90")
    ax.set_title(f"{summary.get('model', '')}: {summary['images']} images")
    ax.grid(alpha=0.3)
    return fig


def _residuals(plt, rows, methods):
    curves = {}
    for name in methods:
        runs = [r for (_, m), r in rows.items() if m == name and r.get("status") == "ok" and r.get("residuals")]
        if runs:
            curves[name] = runs
    if not curves:
        return None
    cols = min(3, len(curves))
    nrows = -(-len(curves) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (name, runs) in zip(axes.flat, curves.items()):
        steps = len(runs[0]["residuals"])
        for s in range(steps):
            per_image = [r["residuals"][s] for r in runs if len(r["residuals"]) == steps]
            length = min(len(c) for c in per_image)
            median = np.median(np.array([[v if v is not None else np.nan for v in c[:length]] for c in per_image]), 0)
            colour = cmap(s / max(steps - 1, 1))
            ax.semilogy(np.arange(1, length + 1), np.clip(median, 1e-12, None), "-o", ms=2, color=colour, lw=1)
        ax.set_title(f"{name} ({len(runs)} images)", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("iteration (model call)")
        ax.set_ylabel("residual |z_k+1 - z_k| (RMS)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle("fixed-point residuals per inversion step (dark: first step, light: last)", fontsize=10)
    fig.tight_layout()
    return fig


def _contraction(plt, rows, methods):
    fig, ax, drawn = None, None, False
    for name in methods:
        runs = [r for (_, m), r in rows.items() if m == name and r.get("status") == "ok" and r.get("contraction")]
        values = np.array([[np.nan if v is None else v for v in r["contraction"]] for r in runs
                           if len(r["contraction"]) == len(runs[0]["contraction"])]) if runs else None
        if values is None or np.isnan(values).all():
            continue
        if fig is None:
            fig, ax = plt.subplots(figsize=(6, 4.2))
        with warnings.catch_warnings():               # steps with one call have no estimate: all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(values, 0)
        ax.plot(runs[0]["timesteps"], median, "-o", ms=3, label=name)
        drawn = True
    if not drawn:
        return None
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("timestep of the inversion step")
    ax.set_ylabel("contraction estimate r_K / r_K-1 (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _grid(plt, out, methods, grid_ids):
    from PIL import Image
    cells = []                                 # (row, [(title, path)])
    for image in grid_ids:
        row = [("input", out / "images" / "input" / f"{image}.png")]
        for name in methods:
            for part in ("reconstruction", "edit", "blend_mask"):
                path = out / "images" / name / f"{image}_{part}.png"
                if path.is_file():
                    row.append((f"{name}\n{part.replace('_', ' ')}", path))
        if row[0][1].is_file() and len(row) > 1:
            cells.append((image, row))
    if not cells:
        return None
    cols = max(len(r) for _, r in cells)
    fig, axes = plt.subplots(len(cells), cols, figsize=(1.6 * cols, 1.8 * len(cells)), squeeze=False)
    for i, (image, row) in enumerate(cells):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(row):
                with Image.open(row[j][1]) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
                if i == 0:
                    ax.set_title(row[j][0], fontsize=6)
        axes[i, 0].text(-0.05, 0.5, image, transform=axes[i, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=6)
    fig.tight_layout()
    return fig
