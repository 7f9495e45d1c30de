"""The official ReNoise algorithm written against diffusers: the baseline renoise is measured against.

A plain, loop-by-loop implementation of the project's REFERENCE-BEHAVIOUR.md (shared/) (what the authors'
code computes), the way a diffusers user would write it: a diffusers UNet2DConditionModel called
once per renoising iteration, diffusers' scheduler objects for the noise tables (alphas_cumprod,
final_alpha_cumprod, sigmas, LCM boundary scalings) with hand-written inverse steps, the reference's
running mean of the raw model outputs, the edit-enhancement regularizer as a per-channel Python
loop with autograd (patch statistics by `unfold`, shifts drawn one `randint` at a time, torch.roll),
and noise correction by optimisation as torch.optim.SGD on torch.norm. It shares no code with
renoise; tests/test_reference_parity.py uses it as the oracle for renoise.invert and
benchmarks/inversion.py (--part speed) times it.

Randomness follows renoise's documented order: the stochastic steps' noises (denoising order), then
the reference noise, then the shifts; noises are drawn in float32 on the generator's device (use a
CPU generator) and then moved to the latent's device and dtype. Sampler math runs in float64, the
regularizer and noise correction in float32; results come back in the latent's dtype.

    sched = Scheduler("euler_ancestral", 4, SDXL_TURBO_SCHEDULER)
    net = diffusers_net(unet, context, text_embeds, time_ids)
    traj, noises, calls = invert(net, sched, z0, torch.Generator().manual_seed(7865), **SDXL_TURBO)
    x0 = denoise(net, sched, traj[-1], noises)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Stable Diffusion's scheduler fields (SD 1.x, SDXL and SDXL-Turbo share them)
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)
# stabilityai/sdxl-turbo scheduler/scheduler_config.json (FACTS.md 1d)
SDXL_TURBO_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                            timestep_spacing="trailing", interpolation_type="linear")
# the reference code's SDXL-Turbo defaults (keyword arguments of `invert`; 4 Euler-ancestral steps)
SDXL_TURBO = dict(K=9, K_first_max=5, avg_first=(0, 5), avg_main=(8, 10), average=True,
                  reg=(0.065, 20.0, 4, 5), nc="optimize")


# ---------------------------------------------------------------------------------------------- regularizer

def patch_kl(e, e_ref, p=4):
    """Patch-KL loss of one map [C, H, W] against e_ref: per p×p patch and channel, summed."""
    def stats(x):
        x = x.unfold(1, p, p).unfold(2, p, p).flatten(-2)          # [C, H/p, W/p, p*p]
        return x.mean(-1), x.var(-1)
    (m0, v0), (m1, v1) = stats(e), stats(e_ref)
    return torch.abs(torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1).sum()


def autocorr(e, gen):
    """Pairwise auto-correlation loss of one map [C, H, W], one random shift per (channel, scale)."""
    total = 0.0
    for ch in range(e.shape[0]):
        x = e[ch][None, None]
        while True:
            s = int(torch.randint(0, x.shape[2] // 2, (1,), generator=gen).item())
            total = total + (x * torch.roll(x, s, dims=2)).mean() ** 2 + (x * torch.roll(x, s, dims=3)).mean() ** 2
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, 2)
    return total


def regularize(e, e_ref, gen, lambda_kl, lambda_ac, rounds, rolls):
    """The edit-enhancement regularizer on one map [C, H, W]: rounds of (KL step, then `rolls` AC steps)."""
    dtype, e, e_ref = e.dtype, e.float(), e_ref.float()
    for _ in range(rounds):
        if lambda_kl > 0:
            v = e.detach().clone().requires_grad_(True)
            patch_kl(v, e_ref).backward()
            e = e - lambda_kl * torch.clip(v.grad, -100, 100)
        if lambda_ac > 0:
            for _ in range(rolls):
                v = e.detach().clone().requires_grad_(True)
                autocorr(v, gen).backward()
                e = e - lambda_ac * (v.grad / rolls)
        e = e.detach()
    return e.to(dtype)


# ---------------------------------------------------------------------------------------------- samplers

class Scheduler:
    """A diffusers scheduler set to `n` steps and the reference's inverse / forward steps for it.

    kind: "ddim" (leading spacing, as the reference assumes), "euler_ancestral" (trailing unless the
    config says otherwise) or "lcm". `config`: scheduler fields (default SD_CONFIG).
    """

    def __init__(self, kind, n, config=None):
        import diffusers
        cls = {"ddim": diffusers.DDIMScheduler, "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
               "lcm": diffusers.LCMScheduler}[kind]
        cfg = dict(SD_CONFIG if config is None else config)
        cfg.setdefault("timestep_spacing", "trailing" if kind == "euler_ancestral" else "leading")
        if kind == "ddim":
            cfg["timestep_spacing"] = "leading"
        self.kind, self.s = kind, cls.from_config(cfg)
        self.s.set_timesteps(n)
        self.ts = self.s.timesteps.tolist()
        self.n = n
        self.config = dict(self.s.config)

    def idx(self, t):
        return self.ts.index(t)

    def abar(self, t):
        return self.s.alphas_cumprod[int(t)].double()

    def prev(self, t):                  # the less noisy timestep after t, None at the end
        if self.kind == "ddim":
            p = t - 1000 // self.n
            return p if p >= 0 else None
        i = self.idx(t)
        return self.ts[i + 1] if i + 1 < len(self.ts) else None

    def scale(self, x, t):              # the model input
        if self.kind == "euler_ancestral":
            return x / (self.s.sigmas[self.idx(t)].double() ** 2 + 1) ** 0.5
        return x

    def stochastic(self, t):
        return self.kind != "ddim" and self.prev(t) is not None

    def sigmas(self, t):
        i = self.idx(t)
        sf, st = self.s.sigmas[i].double(), self.s.sigmas[i + 1].double()
        up = (st**2 * (sf**2 - st**2) / sf**2) ** 0.5
        return sf, up, st**2 / sf

    def lcm_coefs(self, t):              # x_prev = A·x + B·e + C·n
        c_skip, c_out = self.s.get_scalings_for_boundary_condition_discrete(t)
        a = self.abar(t)
        p = self.prev(t)
        an, cn = (self.abar(p) ** 0.5, (1 - self.abar(p)) ** 0.5) if p is not None else (1.0, 0.0)
        return an * (c_out / a**0.5 + c_skip), -an * c_out * (1 - a) ** 0.5 / a**0.5, cn

    def inv(self, z_prev, e, t, noise):
        """The latent at t whose step with model output e (and the stored noise) lands on z_prev."""
        dtype, z_prev, e = z_prev.dtype, z_prev.double(), e.double()
        if self.kind == "ddim":
            p = self.prev(t)
            ap = self.abar(p) if p is not None else torch.as_tensor(self.s.final_alpha_cumprod).double()
            a = self.abar(t)
            out = a**0.5 * (z_prev - (1 - ap) ** 0.5 * e) / ap**0.5 + (1 - a) ** 0.5 * e
        elif self.kind == "euler_ancestral":
            sf, up, down = self.sigmas(t)
            out = z_prev - e * (down - sf) - (noise.double() * up if noise is not None else 0)
        else:
            A, B, C = self.lcm_coefs(t)
            out = (z_prev - B * e - (C * noise.double() if noise is not None else 0)) / A
        return out.to(dtype)

    def det(self, z, e, t):              # the forward step with zero noise
        if self.kind == "ddim":
            return self.s.step(e, t, z).prev_sample
        dtype, z, e = z.dtype, z.double(), e.double()
        if self.kind == "euler_ancestral":
            sf, up, down = self.sigmas(t)
            return (z + e * (down - sf)).to(dtype)
        A, B, _ = self.lcm_coefs(t)
        return (A * z + B * e).to(dtype)

    def noise_coeff(self, t):
        return self.sigmas(t)[1] if self.kind == "euler_ancestral" else self.lcm_coefs(t)[2]

    def add_noise(self, z0, n, t):
        if self.kind == "euler_ancestral":
            return z0 + n * self.s.sigmas[self.idx(t)].to(z0.device)
        return self.s.add_noise(z0, n, torch.tensor([int(t)]))


# ---------------------------------------------------------------------------------------------- the loop

def diffusers_net(unet, context, text_embeds=None, time_ids=None):
    """net(x, t): a diffusers UNet2DConditionModel on its (already scaled) input, batch-1 conditioning
    broadcast to x's batch (SDXL-like UNets take the pooled text_embeds and time_ids)."""
    @torch.no_grad()
    def net(x, t):
        b = x.shape[0]
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.expand(b, -1), "time_ids": time_ids.expand(b, -1)}
        return unet(x, t, encoder_hidden_states=context.expand(b, -1, -1), added_cond_kwargs=added).sample
    return net


def _randn(like, gen):
    return torch.randn(like.shape, generator=gen, device=gen.device).to(like.device, like.dtype)


def invert(net, sched, z0, gen, *, K, K_first_max, avg_first, avg_main, average, reg, nc, clean_ref=False):
    """REFERENCE-BEHAVIOUR.md, loop by loop, for a batch-1 latent z0 [1, C, H, W].

    net(x, t): the model output for the scaled input x. reg: None or (lambda_kl, lambda_ac, rounds,
    rolls); nc: None, "override" or "optimize". Returns (trajectory [n+1, ...] z0 first, the stored
    noises in denoising order (None for deterministic steps), model calls).
    """
    noises = {t: _randn(z0, gen) for t in sched.ts if sched.stochastic(t)}
    ref_noise = _randn(z0, gen) if reg and not clean_ref else None
    eps = lambda z, t: net(sched.scale(z, t), t)  # noqa: E731
    z, traj, calls = z0, [z0], 0
    for t in reversed(sched.ts):
        a, b = avg_first if t < 250 else avg_main
        k_t = min(K_first_max, K) if t < 250 else K
        z_prev, mean_e, e_ref = z, None, None
        approx = z_prev.clone()
        for i in range(k_t + 1):
            if reg and i == 0:
                fwd = z0 if clean_ref else sched.add_noise(z0, ref_noise, t)
                e_ref, e = eps(torch.cat([fwd, approx]), t).chunk(2)
            else:
                e = eps(approx, t)
            calls += 1
            if a <= i < b:
                j = i - a
                mean_e = e.clone() if mean_e is None else j * mean_e / (j + 1) + e / (j + 1)
            if reg and (i >= a or (not average and i > 0)):
                e = regularize(e[0], e_ref[0], gen, *reg)[None]
            approx = sched.inv(z_prev, e, t, noises.get(t))
        if average and mean_e is not None:
            if reg:
                mean_e = regularize(mean_e[0], e_ref[0], gen, *reg)[None]
            approx = sched.inv(z_prev, mean_e, t, noises.get(t))
        if nc and sched.stochastic(t):
            e = eps(approx, t)
            calls += 1
            target = (z_prev.float() - sched.det(approx, e, t).float()) / sched.noise_coeff(t).float()
            if nc == "override":
                noises[t] = target.to(z0.dtype)
            else:
                n = noises[t].float().clone().requires_grad_(True)
                opt = torch.optim.SGD([n], lr=1.8)
                for _ in range(10):
                    opt.zero_grad()
                    torch.norm(n - target).backward()
                    opt.step()
                noises[t] = n.detach().to(z0.dtype)
        z = approx
        traj.append(z)
    return torch.stack(traj), [noises.get(t) for t in sched.ts], calls


def denoise(net, sched, z_T, noises):
    """The denoising pass from z_T with the stored noises (denoising order)."""
    x = z_T
    for t, n in zip(sched.ts, noises):
        e = net(sched.scale(x, t), t)
        x = sched.det(x, e, t) + (sched.noise_coeff(t).to(x.device, x.dtype) * n if n is not None else 0)
    return x
