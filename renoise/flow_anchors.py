"""The flow-inversion anchors: plain Euler inversion, RF-Solver, FireFlow, RF-Inversion, and the newer
iterative inversions Uni-Inv (UniEdit-Flow) and FTEdit's fixed-point Stage I, as solvers of the same core
(renoise.invert / renoise.sample run them when a Plan's `solver` names one).

Notation (renoise.samplers.flow_euler): x_σ = (1-σ)·x0 + σ·ε, the model gives the velocity
v(x, σ) = dx/dσ (denoiser(x, t) with t = σ·T, T = schedule.num_train_timesteps). One step goes from
σ to σ' with h = σ' - σ: h > 0 inverts (towards noise), h < 0 samples (towards the image).

    euler       x' = x + h·v(x, σ)                           1 call a step. As an inversion this is
                the published "plain Euler inversion" (RF-Solver's and FireFlow's `inverse=True`
                loop): v taken at the known, less noisy point and ITS σ. ReNoise's K = 0 (Plan
                iters=0) differs: it takes v(x, σ') at the known point, DDIM inversion's convention.
    rf-solver   Wang et al., "Taming Rectified Flow for Inversion and Editing" (arXiv 2411.04746):
                a second-order Taylor step with a finite-difference derivative from a half step,
                    v1 = v(x, σ);  x_m = x + (h/2)·v1;  v2 = v(x_m, σ + h/2);  v' = (v2 - v1)/(h/2)
                    x' = x + h·v1 + ½h²·v'                   2 calls a step, both ways
                (algebraically the explicit midpoint rule x' = x + h·v2).
    fireflow    Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing"
                (arXiv 2412.07517): the midpoint step whose start velocity is the previous step's
                midpoint velocity,
                    v_i = v(x_0, σ_0) at the first step, else ṽ_{i-1};  x_m = x_i + (h/2)·v_i
                    ṽ_i = v(x_m, σ_i + h/2);  x_{i+1} = x_i + h·ṽ_i      n + 1 calls for n steps, both ways
    rf-inversion  Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic
                Differential Equations" (arXiv 2410.10792), Algorithm 1, the controlled forward ODE
                pulled towards a fixed noise y1 ~ N(0, I) with the controller γ,
                    u = v(Y, σ);  u_c = (y1 - Y)/(1 - σ);  Y' = Y + h·(u + γ·(u_c - u))   1 call a step
                (γ = 0: plain Euler inversion; γ = 1 lands on y1 at σ = 1), and Algorithm 2 for
                sampling, pulled towards the image y0 with η on a window of the steps,
                    u = v(X, σ);  u_c = (X - y0)/σ;  X' = X + h·(u + η_i·(u_c - u))  (h < 0)
                (η = 0: plain Euler sampling; η = 1 at every step lands on y0 whatever X is: the
                controller, not the inversion, then makes the reconstruction).

    uni-inv     Jiao et al., "UniEdit-Flow: Unleashing Inversion and Editing in the Era of Flow Models"
                (arXiv 2504.13109, ICLR 2026), Uni-Inv: a predictor-corrector step that predicts the
                noisier point with the previous step's velocity and takes the step with the velocity there,
                    v_i = v(x_0, σ_0) at the first step, else ṽ_{i-1};  x̂ = x_i + h·v_i
                    ṽ_i = v(x̂, σ_{i+1});  x_{i+1} = x_i + h·ṽ_i              n + 1 calls for n steps
                i.e. one fixed-point iteration of the exact inverse of the Euler sampling step
                (z = x_i + h·v(z, σ_{i+1})) from a predicted start; the paper claims an O(h³) local
                inversion-reconstruction error. It samples by plain Euler. Source: the authors' code,
                DSL-Lab/UniEdit-Flow @ e3633bc1, UniEdit-Flow_FLUX/src/flux/sampling.py `denoise_uniinv`
                (inverse=True; inverse=False falls back to plain `denoise`) and the same recursion in
                UniEdit-Flow_diffusers/schedulers/UniInvEulerScheduler.py (first step v at σ = 0, then
                the corrected latent plus the next step's predictor); settings: its FLUX README's
                reconstruction example (30 steps, guidance 1, alpha 1 = invert all the way, no zero_init:
                edit.py's --zero_init defaults to False and `denoise_uniinv` ignores it).
    ftedit      Xu et al., "Unveil Inversion and Invariance in Flow Transformer for Versatile Image
                Editing" (arXiv 2411.15843, CVPR 2025), Stage I "fixed-point" inversion: K = 2
                fixed-point iterations of the exact inverse of the Euler sampling step, all at σ',
                started at the known point, and the step taken with the MEAN of all K + 1 velocities,
                    z_0 = x;  u_k = v(z_k, σ');  z_{k+1} = x + h·u_k  (k = 0..K);  x' = x + h·mean(u_0..u_K)
                                                                             3 calls a step
                (this is ReNoise's averaged iteration with K = 2 and the window [0, 3), tests check it).
                It samples by plain Euler. Source: the authors' code, Pengchengpcx/FTEdit @ 442ef0f,
                inversion/flow_fixpoint_residual_new.py `fixpoint_step` (model at the upper timestep,
                average over iterations in average_step_ranges) with edit_real_sd35.py's settings
                num_fixpoint_steps=2, average_step_ranges=(0, 5) (covers all 3 iterations), num_steps=30.
                Stage II ("velocity compensation", `edit_img_with_residual`) adds to each sampling step the
                residual between the stored inversion latent and the step's result, so the source branch
                reproduces the stored trajectory exactly by construction; it is an editing device that
                needs the whole trajectory, not an inversion, and is not modelled here.

We write the model's timesteps as σ·T for the midpoints and the less noisy end (t' = None: 0); the
diffusers RF-Inversion pipeline feeds the model unshifted timesteps i/N during inversion, which we do
not copy (FACTS-FLOW §7.4). Settings from the papers' repositories: RF-Inversion γ = 0.5 (inversion),
η = 0.9 on the first 25 % of the sampling steps (its README's edit example: stop 7 of 28).
"""
from __future__ import annotations

import torch

SOLVERS = ("fixed-point", "euler", "rf-solver", "fireflow", "rf-inversion", "uni-inv", "ftedit")
ANCHORS = SOLVERS[1:]
CALLS = {"euler": "n", "rf-solver": "2n", "fireflow": "n + 1", "rf-inversion": "n", "uni-inv": "n + 1",
         "ftedit": "3n"}
FTEDIT_ITERS = 2             # FTEdit's num_fixpoint_steps (edit_real_sd35.py): K + 1 = 3 calls a step
FTEDIT_AVERAGE = (0, 5)      # its average_step_ranges: the iterations [a, b) whose velocities are averaged


def _t(schedule, sigma):
    """The model timestep σ·T as a Python float."""
    return float(sigma) * schedule.num_train_timesteps


# ------------------------------------------------------------------------------------------ steps (pure)

def euler_step(denoiser, x, s, s_next, schedule):
    """x + h·v(x, σ), h = σ' - σ: 1 call."""
    return x + (s_next - s) * denoiser(x, _t(schedule, s))


def rf_solver_step(denoiser, x, s, s_next, schedule):
    """RF-Solver's second-order step (module docstring): 2 calls."""
    h = s_next - s
    v1 = denoiser(x, _t(schedule, s))
    v2 = denoiser(x + (h / 2) * v1, _t(schedule, s + h / 2))
    dv = (v2 - v1) / (h / 2)
    return x + h * v1 + 0.5 * h * h * dv


def fireflow_step(denoiser, x, s, s_next, schedule, v=None):
    """FireFlow's step: -> (x', ṽ), ṽ the midpoint velocity the next step starts from. 1 call
    (2 when v is None: the chain's first step evaluates v(x, σ) itself)."""
    h = s_next - s
    if v is None:
        v = denoiser(x, _t(schedule, s))
    v_mid = denoiser(x + (h / 2) * v, _t(schedule, s + h / 2))
    return x + h * v_mid, v_mid


def rf_inversion_step(denoiser, y, s, s_next, schedule, y1, gamma):
    """Algorithm 1's step σ -> σ' > σ pulled towards y1 with γ: 1 call."""
    u = denoiser(y, _t(schedule, s))
    u_c = (y1 - y) / (1 - s)
    return y + (s_next - s) * (u + gamma * (u_c - u))


def rf_inversion_sample_step(denoiser, x, s, s_next, schedule, y0, eta):
    """Algorithm 2's step σ -> σ' < σ pulled towards y0 with η: 1 call."""
    u = denoiser(x, _t(schedule, s))
    if eta == 0:
        return x + (s_next - s) * u
    u_c = (x - y0) / s
    return x + (s_next - s) * (u + eta * (u_c - u))


def uni_inv_step(denoiser, x, s, s_next, schedule, v=None):
    """Uni-Inv's predictor-corrector step: -> (x', ṽ), ṽ = v(x + h·v, σ') the velocity the next step
    predicts with. 1 call (2 when v is None: the chain's first step evaluates v(x, σ) itself)."""
    h = s_next - s
    if v is None:
        v = denoiser(x, _t(schedule, s))
    v_next = denoiser(x + h * v, _t(schedule, s_next))
    return x + h * v_next, v_next


def ftedit_step(denoiser, x, s, s_next, schedule, iters=FTEDIT_ITERS, average=FTEDIT_AVERAGE):
    """FTEdit's Stage I step: iters + 1 fixed-point iterations z <- x + h·v(z, σ') from z = x, then
    x + h·(mean of the velocities of iterations [a, b)) (no iteration in [a, b): the last iterate).
    iters + 1 calls."""
    h, t_next = s_next - s, _t(schedule, s_next)
    z, mean, m = x, None, 0
    for k in range(iters + 1):
        u = denoiser(z, t_next)
        if average[0] <= k < average[1]:
            mean = u if mean is None else (m * mean + u) / (m + 1)
            m += 1
        z = x + h * u
    return z if mean is None else x + h * mean


def eta_at(plan, i, n):
    """RF-Inversion's η for sampling step i of n: plan.rf_eta inside [start·n, stop·n), else 0."""
    start, stop = plan.rf_eta_window
    return plan.rf_eta if start * n <= i < stop * n else 0.0


# ------------------------------------------------------------------------------------------ chains

def _sigmas(schedule, chain):
    """[(σ, σ')] of the denoising chain [(t, t')]."""
    return [(schedule.sig(t), schedule.sig(tn)) for t, tn in chain]


def invert_chain(denoiser, z0, schedule, chain, plan, generator=None, callback=None):
    """Invert z0 along the denoising `chain` with the anchor plan.solver.
    -> (z_T, trajectory [n+1, B, ...], residuals (one [1, B] per step: the RMS of the step's change),
    model calls). RF-Inversion draws its target noise y1 from `generator`."""
    solver = plan.solver
    if solver not in ANCHORS:
        raise ValueError(f"unknown flow anchor {solver!r}; expected one of {', '.join(ANCHORS)}")
    y1 = None
    if solver == "rf-inversion" and plan.rf_gamma > 0:
        if generator is None:
            raise ValueError("RF-Inversion (rf_gamma > 0) pulls the inversion towards a fixed noise y1 ~ N(0, I): "
                             "pass a torch.Generator as generator=")
        y1 = torch.randn(z0.shape, generator=generator, device=generator.device,
                         dtype=torch.float32).to(z0.device, z0.dtype)
    z, traj, residuals, calls, v = z0, [z0], [], 0, None
    for step_index, (s_next, s) in enumerate(reversed(_sigmas(schedule, chain))):
        # inverting the denoising step (σ_hi -> σ_lo) goes from s = σ_lo up to s_next = σ_hi
        z_prev = z
        if solver == "euler" or (solver == "rf-inversion" and y1 is None):
            z, c = euler_step(denoiser, z, s, s_next, schedule), 1
        elif solver == "rf-solver":
            z, c = rf_solver_step(denoiser, z, s, s_next, schedule), 2
        elif solver == "fireflow":
            c = 1 if v is not None else 2
            z, v = fireflow_step(denoiser, z, s, s_next, schedule, v)
        elif solver == "uni-inv":
            c = 1 if v is not None else 2
            z, v = uni_inv_step(denoiser, z, s, s_next, schedule, v)
        elif solver == "ftedit":
            z, c = ftedit_step(denoiser, z, s, s_next, schedule), FTEDIT_ITERS + 1
        else:
            z, c = rf_inversion_step(denoiser, z, s, s_next, schedule, y1, plan.rf_gamma), 1
        calls += c
        traj.append(z)
        residuals.append(_change(z, z_prev))
        if callback is not None:
            callback(step_index, chain[len(chain) - 1 - step_index][0], z)
    return z, torch.stack(traj), residuals, calls


def sample_chain(denoiser, x, schedule, chain, plan, y0=None, callback=None):
    """Denoise x along `chain` with the anchor plan.solver's own sampler (euler, uni-inv, ftedit: plain
    Euler; rf-solver / fireflow: their steps; rf-inversion: Algorithm 2 with η towards the image y0)."""
    solver = plan.solver
    if solver not in ANCHORS:
        raise ValueError(f"unknown flow anchor {solver!r}; expected one of {', '.join(ANCHORS)}")
    sig, v = _sigmas(schedule, chain), None
    for i, (s, s_next) in enumerate(sig):
        if solver == "rf-solver":
            x = rf_solver_step(denoiser, x, s, s_next, schedule)
        elif solver == "fireflow":
            x, v = fireflow_step(denoiser, x, s, s_next, schedule, v)
        elif solver == "rf-inversion":
            eta = eta_at(plan, i, len(sig))
            if eta and y0 is None:
                raise ValueError("RF-Inversion's sampling controller (rf_eta > 0) pulls towards the image y0: pass it")
            x = rf_inversion_sample_step(denoiser, x, s, s_next, schedule, y0, eta)
        else:
            x = euler_step(denoiser, x, s, s_next, schedule)
        if callback is not None:
            callback(i, chain[i][0], x)
    return x


def sample_calls(solver, n):
    """Model calls `sample_chain` makes for n steps."""
    return {"rf-solver": 2 * n, "fireflow": n + 1}.get(solver, n)


def _change(z, z_prev):
    """[1, B]: the RMS of z - z_prev per sample (an anchor's step has no fixed-point residual)."""
    d = (z - z_prev).detach().flatten(1).float()
    return d.pow(2).mean(1).sqrt()[None]
