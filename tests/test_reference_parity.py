"""renoise.invert / renoise.sample against a plain loop-by-loop implementation of
REFERENCE-BEHAVIOUR.md, on a tiny random diffusers UNet with diffusers' own schedulers.

The loop below is written from the reference description, not from renoise: its sampler math
uses diffusers' scheduler tables (alphas_cumprod, final_alpha_cumprod, sigmas, LCM boundary
scalings) and hand-written inverse steps, the averaging is the reference's running mean, the
regularizer is a per-channel loop (patch statistics by `unfold`, shifts drawn one randint at a
time, torch.roll), and noise correction by optimisation
is torch.optim.SGD on torch.norm. Randomness follows renoise's documented order: the stochastic
steps' noises (denoising order), then the reference noise, then the shifts.
"""
import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_unet

import renoise
from renoise.presets import Plan
from renoise.schedules import Schedule

SIZE = 16
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread (and do not thrash on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net():
    unet = make_tiny_unet("sd1")
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def call(x, t):          # the raw network on its (already scaled) input
        return 0.5 * unet(x, t, encoder_hidden_states=ctx.expand(x.shape[0], -1, -1)).sample

    return call


def kl_unfold(e, e_ref, p=4):
    def stats(x):
        x = x.unfold(1, p, p).unfold(2, p, p).flatten(-2)          # [C, H/p, W/p, p*p]
        return x.mean(-1), x.var(-1)
    (m0, v0), (m1, v1) = stats(e), stats(e_ref)
    return torch.abs(torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1).sum()


def ac_loop(e, gen):
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


def regularize_loop(e, e_ref, gen, lambda_kl, lambda_ac, rounds, rolls):
    """The reference regularizer on one map [C, H, W]: rounds of (KL step, then `rolls` AC steps)."""
    for _ in range(rounds):
        if lambda_kl > 0:
            v = e.detach().clone().requires_grad_(True)
            kl_unfold(v, e_ref).backward()
            e = e - lambda_kl * torch.clip(v.grad, -100, 100)
        if lambda_ac > 0:
            for _ in range(rolls):
                v = e.detach().clone().requires_grad_(True)
                ac_loop(v, gen).backward()
                e = e - lambda_ac * (v.grad / rolls)
        e = e.detach()
    return e


def close(ours, theirs, rel=2e-5):
    """max |ours - theirs| <= rel · max |theirs| (float32 through tens of model calls)."""
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x scale {scale:.3g}"


class Ref:
    """One diffusers scheduler and the reference's inverse / forward steps for it."""

    def __init__(self, kind, n):
        import diffusers
        cls = {"ddim": diffusers.DDIMScheduler, "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
               "lcm": diffusers.LCMScheduler}[kind]
        cfg = dict(SD_CONFIG, timestep_spacing="trailing" if kind == "euler_ancestral" else "leading")
        if kind == "euler_ancestral":
            cfg.pop("clip_sample"), cfg.pop("set_alpha_to_one")
        self.kind, self.s = kind, cls(**cfg)
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

    def scale(self, x, t):
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
        z_prev, e = z_prev.double(), e.double()
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
        return out.float()

    def det(self, z, e, t):              # the forward step with zero noise
        if self.kind == "ddim":
            return self.s.step(e, t, z).prev_sample
        z, e = z.double(), e.double()
        if self.kind == "euler_ancestral":
            sf, up, down = self.sigmas(t)
            return (z + e * (down - sf)).float()
        A, B, _ = self.lcm_coefs(t)
        return (A * z + B * e).float()

    def noise_coeff(self, t):
        return self.sigmas(t)[1] if self.kind == "euler_ancestral" else self.lcm_coefs(t)[2]

    def add_noise(self, z0, n, t):
        if self.kind == "euler_ancestral":
            return z0 + n * self.s.sigmas[self.idx(t)]
        return self.s.add_noise(z0, n, torch.tensor([int(t)]))


def reference_invert(net, ref, z0, gen, *, K, K_first_max, avg_first, avg_main, average, reg, nc, clean_ref=False):
    """REFERENCE-BEHAVIOUR.md, loop by loop (reg: None or (lambda_kl, lambda_ac, rounds, rolls))."""
    noises = {t: torch.randn(z0.shape, generator=gen) for t in ref.ts if ref.stochastic(t)}
    ref_noise = torch.randn(z0.shape, generator=gen) if reg and not clean_ref else None
    eps = lambda z, t: net(ref.scale(z, t), t)  # noqa: E731
    z, traj, calls = z0, [z0], 0
    for t in reversed(ref.ts):
        a, b = avg_first if t < 250 else avg_main
        k_t = min(K_first_max, K) if t < 250 else K
        z_prev, mean_e, e_ref = z, None, None
        approx = z_prev.clone()
        for i in range(k_t + 1):
            if reg and i == 0:
                fwd = z0 if clean_ref else ref.add_noise(z0, ref_noise, t)
                e_ref, e = eps(torch.cat([fwd, approx]), t).chunk(2)
            else:
                e = eps(approx, t)
            calls += 1
            if a <= i < b:
                j = i - a
                mean_e = e.clone() if mean_e is None else j * mean_e / (j + 1) + e / (j + 1)
            if reg and (i >= a or (not average and i > 0)):
                e = regularize_loop(e[0], e_ref[0], gen, *reg)[None]
            approx = ref.inv(z_prev, e, t, noises.get(t))
        if average and mean_e is not None:
            if reg:
                mean_e = regularize_loop(mean_e[0], e_ref[0], gen, *reg)[None]
            approx = ref.inv(z_prev, mean_e, t, noises.get(t))
        if nc and ref.stochastic(t):
            e = eps(approx, t)
            calls += 1
            target = (z_prev - ref.det(approx, e, t)) / ref.noise_coeff(t).float()
            if nc == "override":
                noises[t] = target
            else:
                n = noises[t].clone().requires_grad_(True)
                opt = torch.optim.SGD([n], lr=1.8)
                for _ in range(10):
                    opt.zero_grad()
                    torch.norm(n - target).backward()
                    opt.step()
                noises[t] = n.detach()
        z = approx
        traj.append(z)
    x = z
    for t in ref.ts:                      # denoise back with the stored noises
        e = eps(x, t)
        x = ref.det(x, e, t) + (ref.noise_coeff(t).float() * noises[t] if ref.stochastic(t) else 0)
    return torch.stack(traj), [noises.get(t) for t in ref.ts], calls, x


CASES = {
    # name: (sampler, steps, plan kwargs, reference kwargs)
    "ddim-plain": ("ddim", 6, dict(), dict(K=0, K_first_max=0, avg_first=(0, 1), avg_main=(0, 1), average=True)),
    "ddim-avg": ("ddim", 6, dict(iters=3, window=(1, 4), first_iters=2, first_window=(0, 2)),
                 dict(K=3, K_first_max=2, avg_first=(0, 2), avg_main=(1, 4), average=True)),
    "ddim-avg-reg": ("ddim", 6, dict(iters=2, window=(1, 3), first_iters=1, first_window=(0, 2), lambda_kl=0.05,
                                      lambda_ac=10.0, reg_rounds=2, reg_rolls=3),
                     dict(K=2, K_first_max=1, avg_first=(0, 2), avg_main=(1, 3), average=True)),
    "ddim-noavg-reg-clean": ("ddim", 6, dict(iters=2, window=(0, 3), average=False, lambda_kl=0.05, lambda_ac=10.0,
                                              reg_rounds=2, reg_rolls=3, reference_noise="clean"),
                             dict(K=2, K_first_max=2, avg_first=(0, 3), avg_main=(0, 3), average=False,
                                  clean_ref=True)),
    "euler-noavg-reg-override": ("euler_ancestral", 4, dict(iters=3, window=(2, 4), average=False, lambda_kl=0.065,
                                                            lambda_ac=20.0, reg_rounds=2, reg_rolls=2,
                                                            noise_correction="override"),
                                 dict(K=3, K_first_max=3, avg_first=(2, 4), avg_main=(2, 4), average=False)),
    "euler-turbo-reference": ("euler_ancestral", 4, "sdxl-turbo-reference",
                              dict(K=9, K_first_max=5, avg_first=(0, 5), avg_main=(8, 10), average=True)),
    "lcm-avg-optimize": ("lcm", 4, dict(iters=4, window=(2, 5), first_iters=2, first_window=(0, 3),
                                        noise_correction="optimize"),
                         dict(K=4, K_first_max=2, avg_first=(0, 3), avg_main=(2, 5), average=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invert_equals_reference_loop(case, net):
    sampler, steps, plan_kw, ref_kw = CASES[case]
    if isinstance(plan_kw, str):
        plan = Plan.preset(plan_kw)
        reg = (plan.lambda_kl, plan.lambda_ac, plan.reg_rounds, plan.reg_rolls)
        nc = plan.noise_correction
    else:
        plan = Plan(sampler=sampler, num_steps=steps, **plan_kw)
        reg = (plan.lambda_kl, plan.lambda_ac, plan.reg_rounds, plan.reg_rolls) if plan.regularize else None
        nc = None if plan.noise_correction == "none" else plan.noise_correction
    ref = Ref(sampler, steps)
    schedule = Schedule.from_config(ref.config)
    smod = renoise.samplers.get(sampler)
    den = lambda x, t: net(smod.model_input(x, t, schedule), t)  # noqa: E731
    z0 = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    res = renoise.invert(den, z0, schedule, sampler, steps, plan, generator=torch.Generator().manual_seed(9))
    traj, noises, calls, recon = reference_invert(net, ref, z0, torch.Generator().manual_seed(9), reg=reg, nc=nc,
                                                  **ref_kw)
    assert [t for t, _ in res.chain] == ref.ts
    assert res.model_calls == calls
    for k in range(1, len(traj)):
        close(res.trajectory[k], traj[k])
    for ours, theirs in zip(res.noises, noises):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            close(ours, theirs)
    close(renoise.sample(den, res), recon)
