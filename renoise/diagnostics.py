"""Convergence plots of an inversion: where does each step's fixed-point map contract?

    plot_convergence(result, "convergence.png")

Left: each inversion step's residual curve, the per-sample RMS of z_{k+1} - z_k against the
renoising iteration k (median over the batch, log scale); a straight falling line means linear
convergence at the rate of its slope. Right: per step, the contraction estimate (ratio of the last
two residuals: median and min-max over the batch) and, when the inversion computed it
(`jacobian_iters`), the spectral norm of ∂G_t/∂z at z_t; the dashed line at 1 is where the
paper's contraction argument stops holding. matplotlib is imported here only (a test
dependency, not a runtime one).
"""
from __future__ import annotations

from pathlib import Path

import torch


def plot_convergence(result, path, *, title=None) -> Path:
    """Draw `result`'s (an InversionResult) residual curves and contraction estimates to a PNG at
    `path`; returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_convergence needs matplotlib: pip install matplotlib") from e
    path = Path(path)
    steps = len(result.residuals)
    colors = plt.cm.viridis(torch.linspace(0, 1, max(steps, 2)).tolist())
    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for s, r in enumerate(result.residuals):
        med = r.detach().float().median(dim=1).values.clamp_min(1e-30).cpu()
        t = int(result.timesteps[len(result.timesteps) - 1 - s])
        ax_r.semilogy(range(len(med)), med.tolist(), "o-", ms=3, color=colors[s], label=f"step {s} (t={t})")
    ax_r.set(xlabel="renoising iteration k", ylabel="RMS of $z_{k+1} - z_k$ (median)", title="residuals")
    ax_r.legend(fontsize=7)

    x = list(range(steps))
    if result.contraction:
        c = torch.stack([v.detach().float().cpu() for v in result.contraction])        # [steps, B]
        ok = ~c.isnan().all(1)                  # steps with a single call have no ratio
        if bool(ok.any()):
            c, xs = c[ok], [i for i in x if ok[i]]
            lo = c.nan_to_num(nan=float("inf")).min(1).values
            hi = c.nan_to_num(nan=float("-inf")).max(1).values
            ax_c.fill_between(xs, lo.tolist(), hi.tolist(), alpha=0.25, color="C0")
            ax_c.plot(xs, c.nanmedian(1).values.tolist(), "o-", color="C0", label="residual ratio")
    if result.jacobian_norm:
        jn = torch.stack([v.detach().float().cpu() for v in result.jacobian_norm])
        ax_c.fill_between(x, jn.min(1).values.tolist(), jn.max(1).values.tolist(), alpha=0.25, color="C1")
        ax_c.plot(x, jn.median(1).values.tolist(), "s-", color="C1", label="‖∂G/∂z‖₂ at z_t")
    ax_c.axhline(1.0, ls="--", color="gray", lw=1)
    ax_c.set(xlabel="inversion step (z0 → z_T)", ylabel="per-step estimate (median, min–max)",
             title="contraction")
    if ax_c.get_legend_handles_labels()[0]:
        ax_c.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
