"""The summary of `renoise eval`: per method, each metric's median, p10, p90, and mean ± 95% CI.

    s = summarize(rows, methods, items, info)     # a JSON-able dict
    markdown(s)                                   # the same as tables

Rows of images with a problem (bad input) are listed once per image and left out of the numbers;
a pair whose inversion failed (e.g. NaN) is listed under its method. The 95% confidence interval
of the mean is ±1.96·s/√n (normal approximation). The summary depends only on the rows, never on
how many processes made them or in which order.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["summarize", "markdown", "METRICS"]

METRICS = {                                   # row key -> label (the tables' order)
    "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS",
    "latent_psnr": "latent PSNR (dB)", "latent_ssim": "latent SSIM",
    "edit_success": "edit success", "edit_background_psnr": "edit background PSNR (dB)",
    "calls_invert": "model calls (inversion; UNet or flow transformer)",
    "budget_used": "share of the call budget used",
    "evals_invert": "model evaluations (inversion, CFG counts 2)",
    "cost_invert": "cost (inversion, call-equivalents: evaluations + backward passes at their measured cost)",
    "seconds_invert": "seconds (inversion)",
    "seconds_total": "seconds (all)", "peak_memory_mib": "peak memory (MiB)",
}


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    n = int(v.size)
    ci = 1.96 * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else None
    return {"n": n, "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "mean": float(v.mean()), "ci95": ci}


def summarize(rows: dict, methods: list[str], items: list, info: dict) -> dict:
    """rows: {(image, method): row}; only the given methods and items (in their order) count."""
    ids = [it.id for it in items]
    bad, per_method = {}, {}
    for name in methods:
        ok, failed, missing, stalled = [], [], [], []
        for image in ids:
            row = rows.get((image, name))
            if row is None:
                missing.append(image)
            elif row["status"] == "bad_input":
                bad.setdefault(image, row["error"])
            elif row["status"] == "failed":
                failed.append({"image": image, "error": row["error"]})
            else:
                ok.append(row)
                for c in row.get("not_converged") or []:
                    stalled.append({"image": image, **c})
        metrics = {}
        for key in METRICS:
            values = [float(r[key]) for r in ok if r.get(key) is not None]
            if values:
                metrics[key] = _stats(values)
        per_method[name] = {"images": len(ok), "failed": failed, "missing": missing, "metrics": metrics,
                            "not_converged": stalled}
    return {**info, "images": len(ids), "bad_inputs": [{"image": k, "error": v} for k, v in bad.items()],
            "methods": per_method}


def _num(x, digits=2):
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def markdown(s: dict) -> str:
    """summary.md: one table of headline numbers, then a table per metric over the methods."""
    lines = [f"# renoise eval: {s.get('model', '')}", "",
             f"{s['images']} images, {len(s['methods'])} methods; {len(s['bad_inputs'])} bad inputs skipped.", ""]
    lines += ["| method | images | failed | median PSNR | p10 | p90 | mean ± 95% CI | model calls | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in s["methods"].items():
        p, c, t = (m["metrics"].get(k, {}) for k in ("psnr", "calls_invert", "seconds_invert"))
        mean = f"{_num(p.get('mean'))} ± {_num(p.get('ci95'))}" if p else "–"
        lines.append(f"| {name} | {m['images']} | {len(m['failed'])} | {_num(p.get('median'))} | "
                     f"{_num(p.get('p10'))} | {_num(p.get('p90'))} | {mean} | {_num(c.get('median'), 0)} | "
                     f"{_num(t.get('median'), 3)} |")
    for key, label in METRICS.items():
        if not any(key in m["metrics"] for m in s["methods"].values()):
            continue
        digits = 3 if key in ("ssim", "lpips", "latent_ssim", "edit_success", "seconds_invert", "seconds_total",
                              "budget_used") else 2
        lines += ["", f"## {label}", "", "| method | n | median | p10 | p90 | mean ± 95% CI |", "|---|---|---|---|---|---|"]
        for name, m in s["methods"].items():
            st = m["metrics"].get(key)
            if st:
                lines.append(f"| {name} | {st['n']} | {_num(st['median'], digits)} | {_num(st['p10'], digits)} | "
                             f"{_num(st['p90'], digits)} | {_num(st['mean'], digits)} ± {_num(st['ci95'], digits)} |")
    problems = [(name, f) for name, m in s["methods"].items() for f in m["failed"]]
    if s["bad_inputs"] or problems:
        lines += ["", "## Skipped", ""]
        lines += [f"- bad input {b['image']}: {b['error']}" for b in s["bad_inputs"]]
        lines += [f"- {name} failed on {f['image']}: {f['error']}" for name, f in problems]
    changed = s.get("inputs_changed") or []
    if changed:
        lines += ["", "## Redone in this run: inputs changed", ""]
        lines += [f"- {c['image']} ({c['method']})" for c in changed]
    stalled = [(name, c) for name, m in s["methods"].items() for c in m.get("not_converged", [])]
    if stalled:
        lines += ["", "## Not converged", "",
                  "Inversion steps that used all their calls and stopped above the plan's tolerance (residual in "
                  "the model's input scale). What to do: allow more calls (the plan's `iters`), or use another "
                  "preset (plain iteration without tolerance stopping converges where a solver stalls).", ""]
        lines += [f"- {name} on {c['image']}: step {c['step']} (t={c['timestep']}), residual {c['residual']:.2g} > "
                  f"tol {c['tol']:.2g} after {c['calls']} calls" for name, c in stalled]
    notes = s.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
