"""Fixed-point solvers on the demo model's slowest ReNoise step (issue 14).

    python benchmarks/slow_step.py [--images 16] [--steps 4] [--calls 12] [--out benchmarks/out/slow_step.json]

DDIM inversion's second step (t = 1 -> the next timestep) contracts by only ~0.9 per call on the
demo model while every other step converges in one to three calls, so it is where the UNet calls
go. This script takes that step for a batch of held-out scenes, z = G(z) = inverse_step(z_1,
ε(z, t)), warm-started at inverse_step(z_1, ε(z_1, 1)) (the demo preset's start), and runs each
solver for up to --calls model calls. The table gives the median over scenes of the true residual
RMS(G(ẑ) - ẑ) of each solver's answer ẑ after n calls (evaluated with one extra, uncounted call),
which for this step is √ᾱ_t times the step's local reconstruction error. Solvers:

- renoise's own: plain iteration, over-relaxed iteration (relax β), safeguarded Anderson (m = 3)
  with and without relax = 2 (renoise.fixed_point.iterate);
- written here for the comparison: textbook type-II Anderson (least squares, no safeguard) and
  type-I Anderson, limited-memory Broyden ("bad" update), heavy-ball momentum, and Jacobian-free
  Newton-Krylov (GMRES on (G - I)d = -f, Jacobian-vector products by finite differences, one call
  each; forward-mode jvp costs 6.5 calls on this CPU, see RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


from renoise import samplers  # noqa: E402
from renoise.demo import held_out, render_tensor  # noqa: E402
from renoise.fixed_point import iterate, rms  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402
from renoise.pipeline import Editor  # noqa: E402


def flat(z):
    return z.flatten(1)


def heavy_ball(G, z0, n, beta=2.5, mu=0.4):
    """c_{k+1} = c_k + β(G(c_k) - c_k) + μ(c_k - c_{k-1})."""
    c, prev, out = z0, z0, []
    for _ in range(n):
        g = G(c)
        out.append(g)
        c, prev = c + beta * (g - c) + mu * (c - prev), c
    return out


def anderson_textbook(G, z0, n, m=3, beta=1.0, kind=2):
    """Anderson mixing with no safeguard: type II (γ = argmin ‖f - ΔF·γ‖) or type I
    (γ = (ΔXᵀΔF)⁻¹ΔXᵀf); x' = x + βf - (ΔX + βΔF)·γ."""
    shape, xs, fs, out = z0.shape, [], [], []
    x = flat(z0)
    for _ in range(n):
        g = flat(G(x.view(shape)))
        f = g - x
        out.append(g.view(shape))
        xs, fs = (xs + [x])[-(m + 1):], (fs + [f])[-(m + 1):]
        if len(fs) == 1:
            x = x + beta * f
            continue
        dX = torch.stack([b - a for a, b in zip(xs, xs[1:])], -1).double()
        dF = torch.stack([b - a for a, b in zip(fs, fs[1:])], -1).double()
        if kind == 2:
            gamma = torch.linalg.lstsq(dF, f.double()[..., None]).solution
        else:
            A = dX.transpose(1, 2) @ dF
            A = A + 1e-10 * A.diagonal(dim1=1, dim2=2).abs().mean(-1)[:, None, None] * torch.eye(A.shape[-1])
            gamma = torch.linalg.solve(A, dX.transpose(1, 2) @ f.double()[..., None])
        x = x + beta * f - ((dX + beta * dF) @ gamma)[..., 0].float()
    return out


def broyden(G, z0, n, m=8):
    """Limited-memory 'bad' Broyden on f = G(x) - x from H₀ = -I (the first step is the plain step):
    x' = x - H f, H ← H + (s - H y) yᵀ / yᵀy."""
    shape, S, Y, HY = z0.shape, [], [], []
    x = flat(z0)

    def apply(v):
        r = -v
        for s, y, hy in zip(S, Y, HY):
            r = r + (s - hy) * ((y * v).sum(1, keepdim=True) / (y * y).sum(1, keepdim=True))
        return r

    g = flat(G(x.view(shape)))
    f, out = g - x, [g.view(shape)]
    for _ in range(n - 1):
        xn = x - apply(f)
        gn = flat(G(xn.view(shape)))
        out.append(gn.view(shape))
        fn = gn - xn
        s, y = xn - x, fn - f
        HY, S, Y = (HY + [apply(y)])[-m:], (S + [s])[-m:], (Y + [y])[-m:]
        x, f = xn, fn
    return out


def newton_krylov(G, z0, n, inner=3, eps=1e-3):
    """Newton on f(x) = G(x) - x; each Newton step solves J d = -f (J = G' - I) by GMRES(inner) with
    finite-difference products J v ≈ (G(x + hv) - G(x))/h - v (one call each)."""
    shape = z0.shape
    x = flat(z0)
    g = flat(G(x.view(shape)))
    f, out = g - x, [g.view(shape)]
    while len(out) < n:
        V, JV = [], []
        v = -f / rms(f)[:, None].clamp_min(1e-30)
        d = torch.zeros_like(x)
        for _ in range(inner):
            if len(out) >= n:
                break
            h = eps * (1 + rms(x)[:, None]) / rms(v)[:, None]
            gv = flat(G((x + h * v).view(shape)))
            out.append((x + d).view(shape))                # the best answer so far: x + the current d
            V.append(v)
            JV.append((gv - g) / h - v)
            A, Vm = torch.stack(JV, -1).double(), torch.stack(V, -1).double()
            y = torch.linalg.lstsq(A, (-f).double()[..., None]).solution
            d = (Vm @ y)[..., 0].float()
            r = -f - (A @ y)[..., 0].float()
            v = r
            for u in V:
                v = v - (v * u).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True) * u
            v = v / rms(v)[:, None].clamp_min(1e-30)
        if len(out) >= n:
            break
        x = x + d
        g = flat(G(x.view(shape)))
        f = g - x
        out.append(g.view(shape))
    return out[:n]


def ours(G, z0, n, **kw):
    """renoise.fixed_point.iterate, n calls: its answer after each call."""
    return iterate(G, z0, n, keep_iterates=True, **kw).iterates


SOLVERS = {
    "plain iteration": lambda G, z, n: ours(G, z, n),
    "relax 2 (renoise)": lambda G, z, n: ours(G, z, n, relax=2.0),
    "safeguarded Anderson m=3 (renoise)": lambda G, z, n: ours(G, z, n, anderson=3),
    "safeguarded Anderson m=3, relax 2 (renoise)": lambda G, z, n: ours(G, z, n, anderson=3, relax=2.0),
    "textbook Anderson II m=3": lambda G, z, n: anderson_textbook(G, z, n, 3),
    "textbook Anderson II m=3, β=2": lambda G, z, n: anderson_textbook(G, z, n, 3, 2.0),
    "textbook Anderson I m=3": lambda G, z, n: anderson_textbook(G, z, n, 3, kind=1),
    "Broyden (bad, m=8)": lambda G, z, n: broyden(G, z, n),
    "heavy ball β=2.5, μ=0.4": lambda G, z, n: heavy_ball(G, z, n),
    "Newton-Krylov, FD jvp, GMRES(3)": lambda G, z, n: newton_krylov(G, z, n),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="DDIM steps (the slow step is the second)")
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/slow_step.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pipeline("demo")
    scenes = [held_out(i, max_shapes=3) for i in range(a.images)]
    x = render_tensor(scenes)
    editor = Editor(pipe, "demo", num_steps=a.steps, plan_overrides=dict(iters=9, tol=None))
    smod, sch = samplers.get("ddim"), editor.schedule
    (t, tn), (t1, _) = sch.chain(a.steps, "ddim")[-2:]
    with torch.no_grad():
        inv = editor.invert(x, [s.caption for s in scenes], sample_posterior=False)
        den = editor.denoiser([s.caption for s in scenes], tuple(x.shape[-2:]))
        z1 = inv.result.trajectory[1]

        def G(z):
            return smod.inverse_step(z1, den(z, t), t, tn, sch)

        z0 = smod.inverse_step(z1, den(z1, t1), t, tn, sch)
        rows = {}
        for name, solve in SOLVERS.items():
            answers = solve(G, z0, a.calls)
            rows[name] = [float(rms(G(z) - z).median()) for z in answers]
            print(f"{name:46s}" + " ".join(f"{r:.1e}" for r in rows[name]), flush=True)
    shown = [n for n in (3, 6, 9, 12) if n <= a.calls]
    print(f"\nmedian residual of {a.images} held-out scenes, DDIM {a.steps}, step t = {t1} -> {t}\n")
    print("| solver | " + " | ".join(f"{n} calls" for n in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[n - 1]:.1e}" for n in shown) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
                                 platform.machine(), "images": a.images, "steps": a.steps, "timestep": t,
                                 "residuals": rows}, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
