"""The flow inversion's hard step, solved alone: how fast each solver lowers its defect per call.

    python benchmarks/flow_leaving_step.py --steps 24 --images 4

On the demo flow model's held-out scenes, a reference chain is solved first (`demo-flow-fast` with 30
Anderson calls on the five lowest steps). Then the step that leaves the image (σ 0.001 -> σ₁) and the
one above it are solved again from the warm start the inversion uses there (inverse_step with the
step below's output) with 8 calls of:
  - plain iteration z <- G(z);
  - a spectral preconditioner: z <- z + P(G(z) - z), P per frequency 1 + β(1/(r + (1 - r)·s/(s + σ₁²)) - 1),
    r = σ₀/σ₁, s the image latent's power spectrum averaged over rings: the inverse of the step's Jacobian
    if the denoiser shrank each frequency like a Gaussian prior with that spectrum;
  - Anderson (m = 1, 3 unless --anderson; renoise.fixed_point, with --relax and --trust).
The defect after each call is rms(step(z, v(z, σ₁)) - z_below) (one more call each, not counted).

--spectrum: the step map's exact Jacobian J = ∂step(z, v(z, σ₁))/∂z (autograd, D x D for a D-dim latent)
  - at the fixed point (200 Anderson calls): the range of J's eigenvalues (plain iteration's error
    contracts by |1 - λ| along each), and GMRES on that linear map from the warm start's defect: the
    defect after k matrix-vector products, what any k-call Krylov method (Anderson with an unbounded
    window) reaches if the map were linear;
  - at the warm start: the Newton step restricted to that k-dim Krylov space of the warm start's own
    Jacobian, and its true defect: how far the linear model holds between warm start and fixed point.
"""
from __future__ import annotations

import argparse

import torch

from renoise import fixed_point
from renoise.demo import held_out, render_tensor
from renoise.evaluation.methods import parse_methods
from renoise.models import load_pipeline
from renoise.pipeline import Editor
from renoise.samplers import flow_euler


def rms(x):
    return float(x.pow(2).mean().sqrt())


def gmres(jac, r0, k):
    """GMRES on jac from r0 with j = 1..k products -> [(corrections dz_j [D], linear defect rms)]: dz_j in
    the j-dim Krylov space minimises ||r0 - jac·dz_j||."""
    basis, hess, out = [r0 / r0.norm()], torch.zeros(k + 1, k, dtype=torch.float64), []
    for j in range(k):
        w = jac @ basis[j]
        for i in range(j + 1):
            hess[i, j] = w @ basis[i]
            w = w - hess[i, j] * basis[i]
        hess[j + 1, j] = w.norm()
        basis.append(w / hess[j + 1, j])
        e1 = torch.zeros(j + 2, dtype=torch.float64)
        e1[0] = r0.norm()
        y = torch.linalg.lstsq(hess[:j + 2, :j + 1], e1).solution
        defect = float((e1 - hess[:j + 2, :j + 1] @ y).norm()) / r0.numel() ** 0.5
        out.append((torch.stack(basis[:j + 1], 1) @ y, defect))
    return out


def spectrum(S, G, below, z0, calls):
    """Print the --spectrum lines for one step (S: the sampler step as a function of z, G: the map solved)."""
    def defect(z):
        return rms(S(z) - below)

    def jacobian(z):
        with torch.enable_grad():
            f = lambda flat: S(flat.view_as(z)).flatten()
            return torch.autograd.functional.jacobian(f, z.flatten()).double()

    zs = fixed_point.iterate(G, z0, 200, anderson=5).z
    ev = torch.linalg.eigvals(jacobian(zs))
    r0 = (S(z0) - below).flatten().double()
    lin = [d for _, d in gmres(jacobian(zs), r0, calls)]
    print(f"    fixed point (defect {defect(zs):.1e}, {rms(zs - z0):.1e} from the warm start): eigenvalues of J "
          f"{ev.real.min():.3f}..{ev.real.max():.3f} (|imag| <= {ev.imag.abs().max():.3f}), plain contracts by "
          f"{(1 - ev).abs().max():.3f}; GMRES on J there: " + " ".join(f"{d:.1e}" for d in lin))
    newton = [f"{d:.1e}/{defect(z0 - dz.view_as(z0).to(z0.dtype)):.1e}" for dz, d in gmres(jacobian(z0), r0, calls)]
    print("    Newton-Krylov from the warm start, k products, linear/true defect: " + " ".join(newton))


def ring_spectrum(z):
    """|FFT(z)|² / (h·w) per channel, averaged over rings of equal |f| (same shape as z's FFT)."""
    power = torch.fft.fft2(z.double()).abs() ** 2 / (z.shape[-1] * z.shape[-2])
    h, w = z.shape[-2:]
    radius = (torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2).sqrt()
    rings = (radius * h).round().long()
    out = torch.zeros_like(power)
    for b in rings.unique():
        m = rings == b
        out[..., m] = power[..., m].mean(-1, keepdim=True)
    return out


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.5, help="how much of the preconditioner to apply")
    ap.add_argument("--anderson", type=int, nargs="+", default=[1, 3], help="Anderson window sizes m")
    ap.add_argument("--relax", type=float, default=1.0, help="Anderson's relax (its upper bound on β)")
    ap.add_argument("--trust", type=float, default=20.0, help="Anderson's trust radius (renoise.fixed_point)")
    ap.add_argument("--spectrum", action="store_true", help="the step map's Jacobian: eigenvalues, Krylov bounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("demo-flow", dtype=torch.float32)
    low = 1 + 4.5 * 999 / (args.steps - 1)
    spec = f"ref:preset=demo-flow-fast,first_until={low},first_iters=30,first_window=[30,31],tol=none,anderson=3"
    plan = parse_methods([spec])[0].plan("demo-flow-fast", {"num_steps": args.steps})
    for i in range(args.images):
        scene = held_out(i)
        x = render_tensor(scene)
        editor = Editor(pipe, plan)
        res = editor.invert(x, scene.caption, sample_posterior=False).result
        den, sched = editor.denoiser([scene.caption], x.shape[-2:]), res.schedule
        steps = list(reversed(res.chain))
        for j in (1, 2):
            (t, tn), (t_below, _) = steps[j], steps[j - 1]
            below = res.trajectory[j]
            s1, s0 = float(sched.sig(t)), float(sched.sig(tn))

            def G(z):
                return flow_euler.inverse_step(below, den(z, t), t, tn, sched)

            def S(z):
                return flow_euler.step(z, den(z, t), t, tn, sched)

            def defect(z):
                return rms(S(z) - below)

            z0 = flow_euler.inverse_step(below, den(below, t_below), t, tn, sched)
            s, r = ring_spectrum(below), s0 / s1
            precond = 1 + args.beta * (1 / (r + (1 - r) * s / (s + s1 ** 2)) - 1)
            for name, P in (("plain", None), (f"spectral β={args.beta}", precond)):
                z, out = z0.clone(), []
                for _ in range(args.calls):
                    d = G(z) - z
                    if P is not None:
                        d = torch.fft.ifft2(torch.fft.fft2(d.double()) * P).real.to(z.dtype)
                    z = z + d
                    out.append(defect(z))
                print(f"image {i} step {j} (σ {s0:.4f} -> {s1:.4f}) {name:14s}: " + " ".join(f"{v:.1e}" for v in out))
            for m in args.anderson:
                ans = fixed_point.iterate(G, z0, args.calls, anderson=m, relax=args.relax, anderson_trust=args.trust).z
                print(f"image {i} step {j} anderson m={m}: defect after {args.calls} calls {defect(ans):.1e}")
            if args.spectrum:
                spectrum(S, G, below, z0, args.calls)


if __name__ == "__main__":
    main()
