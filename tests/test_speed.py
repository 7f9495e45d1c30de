"""renoise.speed and half precision: compiled (inductor) UNet and inversion steps equal eager,
compiled regions trace as one graph and are reused, bf16/fp16 inversions stay within stated
tolerances of fp32, CUDA graphs on CUDA, bad modes refused.

Compiling is slow on a small CPU, so every compiled thing is built once per module (fixtures) on a
tiny SDXL-like UNet and a reduced sdxl-turbo-reference plan (same structure: Euler-ancestral,
averaging, regularizer, optimised noise correction; fewer iterations).
"""
import pytest
import torch
from tiny_models import TINY_POOLED_DIM, _randomise, tiny_unet_config

import renoise
from renoise.models import UNet, UNetConfig
from renoise.pipeline import Conditioning, GuidedDenoiser
from renoise.presets import Plan
from renoise.schedules import Schedule

SCHEDULER_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                        steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing")
SCHEDULE = Schedule.from_config(SCHEDULER_CONFIG)
PLAN = Plan.preset("sdxl-turbo-reference").replace(iters=2, window=(1, 3), first_iters=1, first_window=(0, 2),
                                                   reg_rounds=1, reg_rolls=2, nc_steps=3)
SIDE = 8
# agreement of a whole inversion (z_T) and its reconstruction with fp32, max |x - x_fp32| / max |x_fp32|;
# measured on this setup, seeds 0-4: bf16 z_T 0.8-1.3e-2, recon 2.6-5.1e-2; fp16 z_T 1.3-1.8e-3, recon 3.2-6.3e-3
HALF_TOL = {torch.bfloat16: (3e-2, 0.15), torch.float16: (5e-3, 2e-2)}
NO_CUDA = "needs a CUDA device; torch.cuda.is_available() is False on this machine"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def unet():
    """A tiny SDXL-like UNet (one level, one layer: little to compile), random weights."""
    one_level = dict(block_out_channels=(32,), layers_per_block=1, attention_head_dim=2, transformer_layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    cfg = UNetConfig.from_dict({**tiny_unet_config("sdxl"), **one_level})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _randomise(UNet(cfg), seed=0)
    with torch.no_grad():                   # smaller outputs: the renoising map contracts
        model.conv_out.weight.mul_(0.3)
        model.conv_out.bias.mul_(0.3)
    return model.eval().requires_grad_(False)


def denoiser(unet, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(1, 7, 64, generator=g), torch.randn(1, TINY_POOLED_DIM, generator=g),
                        torch.tensor([[128.0, 128, 0, 0, 128, 128]]))
    cond = Conditioning(*(v.to(device, unet.dtype) for v in cond._fields()))
    return GuidedDenoiser(unet, SCHEDULE, PLAN.sampler, cond)


def latent(seed=0, device="cpu"):
    return torch.randn(1, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)).to(device)


def invert(den, z0, compile=None):
    return renoise.invert(den, z0, SCHEDULE, PLAN.sampler, PLAN.num_steps, PLAN,
                          generator=torch.Generator().manual_seed(7865), compile=compile)


def assert_same_inversion(got, want, tol):
    assert got.model_calls == want.model_calls
    assert rel(got.z_T, want.z_T) < tol
    for a, b in zip(got.trajectory, want.trajectory):
        assert rel(a, b) < tol
    for a, b in zip(got.noises, want.noises):
        assert (a is None) == (b is None) and (a is None or rel(a, b) < tol)
    for a, b in zip(got.residuals, want.residuals):
        assert a.shape == b.shape and rel(a, b) < 100 * tol      # differences of nearby iterates


@pytest.fixture(scope="module")
def eager(unet):
    den = denoiser(unet)
    res = invert(den, latent())
    return res, den.calls, renoise.sample(denoiser(unet), res)


# ------------------------------------------------------------------------------ the switch, refused input

def test_bad_modes_are_refused(unet):
    den, z0 = denoiser(unet), latent()
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        invert(den, z0, compile="fast")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, but the tensors are on cpu"):
        invert(den, z0, compile="cuda-graphs")
    with pytest.raises(ValueError, match="inference only"):
        renoise.invert(den, z0, SCHEDULE, PLAN.sampler, 4, PLAN, generator=torch.Generator(), grad="unrolled",
                       compile="trace")
    with pytest.raises(ValueError, match="nn.Module"):
        renoise.accelerate(lambda x: x)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        renoise.accelerate(unet, "cuda-graphs")
    from types import SimpleNamespace

    from renoise.pipeline import Editor
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Editor(SimpleNamespace(unet=unet, scheduler_config=SCHEDULER_CONFIG), compile="cuda-graphs")


def test_step_region_is_one_graph_reused_for_new_images_and_prompts(unet, eager):
    """dynamo traces each step (and each denoising step) without a graph break (fullgraph), gives
    the eager numbers, and a second image with another prompt replays what it traced."""
    want, want_calls, want_recon = eager
    den = denoiser(unet)
    got = invert(den, latent(), compile="trace")
    assert_same_inversion(got, want, 1e-6)
    assert den.calls == want_calls == want.model_calls
    assert rel(renoise.sample(denoiser(unet), got, compile="trace"), want_recon) < 1e-6
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = invert(denoiser(unet, seed=1), latent(seed=1), compile="trace")
        invert(den, latent(seed=2), compile="trace")         # the same denoiser again: its call count is no guard
        renoise.sample(den, got, compile="trace")
    assert rel(again.z_T, invert(denoiser(unet, seed=1), latent(seed=1)).z_T) < 1e-6
    assert den.calls == 2 * want_calls + PLAN.num_steps


def test_compiled_regions_keep_the_step_checks(unet):
    den = denoiser(unet)
    z0 = latent()
    with pytest.raises(renoise.inversion.NonFiniteLatentError, match="inversion step 0"):
        broken = GuidedDenoiser(unet, SCHEDULE, PLAN.sampler, Conditioning(
            torch.full((1, 7, 64), float("nan")), den.cond.text_embeds, den.cond.time_ids))
        invert(broken, z0, compile="trace")


def test_memory_mapped_weights_compile(unet, tmp_path):
    """Weights loaded zero-copy from a safetensors file (views of its map) have a storage each: they
    save again, and the UNet call traces as a nested compile region (no aliased inputs)."""
    from safetensors.torch import save_file

    from renoise.models import load_unet
    from renoise.denoisers import _unet_call
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    mapped = load_unet(tmp_path / "unet.safetensors", config=unet.config)
    save_file(mapped.state_dict(), tmp_path / "again.safetensors")
    den = denoiser(mapped)
    c = den.cond
    x, t = latent(), torch.tensor(749.0, dtype=torch.float64)
    run = torch.compile(lambda x: _unet_call(mapped, x, t, c.context, c.text_embeds, c.time_ids, None),
                        backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(run(x), unet(x, t, c.context, text_embeds=c.text_embeds, time_ids=c.time_ids))


# ------------------------------------------------------------------------------ inductor equals eager

def test_compiled_step_equals_eager(unet):
    """One whole inversion step (K+1 model calls, inverse steps, averaging window, regularizer, noise
    correction: one more call) as one inductor region: fp32 relative error < 1e-5, the same calls.
    (Whole inversions through the region are checked above with dynamo's tracing, which is what
    decides the region's structure; here inductor's numbers, on the step that has every part.)"""
    from renoise.inversion import _as_tensor_t, _step, _step_shifts
    smod = renoise.samplers.get(PLAN.sampler)
    t, tn = SCHEDULE.chain(PLAN.num_steps, PLAN.sampler)[1]          # a main step, stochastic
    at = PLAN.at(t)
    # the stored noise starts far (> nc_steps · nc_lr) from its target: the reference's unit-length
    # steps that overshoot near the target point along the difference of nearby vectors, which
    # magnifies any rounding difference (here ~100x); away from that, compiled equals eager to 1e-5
    z_prev, noise, z0 = latent(2), 4 * latent(3), latent(4)
    z_ref = smod.add_noise(z0, latent(5), t, SCHEDULE)
    shifts = _step_shifts(PLAN, at, z_prev, torch.Generator().manual_seed(6))
    args = (smod, SCHEDULE, PLAN, {}, z_prev)
    den, ref_den = denoiser(unet), denoiser(unet)
    want = _step(ref_den, *args, t, tn, noise, z_ref, at, shifts, True)
    got = renoise.speed.compiled_step("compile")(den, *args, _as_tensor_t(t, "cpu"), _as_tensor_t(tn, "cpu"), noise,
                                                 z_ref, at, shifts, True)
    assert ref_den.calls == at[0] + 2 and den.calls == 0       # the region leaves the count to its caller
    for a, b in zip(got[:3], want[:3]):
        assert rel(a, b) < 1e-5
    assert bool(got[3]) and bool(want[3])


def test_compiled_unet_equals_eager(unet):
    """renoise.accelerate(unet): inductor equals eager (fp32 relative error < 1e-5). Same shapes as
    the step's batched call above, so that inductor's caches serve both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIDE, SIDE, generator=g)
    ctx, pooled = torch.randn(2, 7, 64, generator=g), torch.randn(2, TINY_POOLED_DIM, generator=g)
    ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)
    t = torch.tensor(749.0, dtype=torch.float64)
    with torch.no_grad():
        want = unet(x, t, ctx, text_embeds=pooled, time_ids=ids)
        got = renoise.accelerate(unet, "compile")(x, t, ctx, text_embeds=pooled, time_ids=ids)
    assert rel(got, want) < 1e-5


# ------------------------------------------------------------------------------ half precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inversion_agrees_with_fp32(unet, eager, dtype):
    """Weights and activations in half precision; latents, sampler math, averaging, regularizer and
    noise correction stay fp32 (the denoiser casts at the UNet's boundary). fp16 runs on the CPU, but
    its convolutions take PyTorch's slow reference path there (about 4x bf16's time)."""
    want, _, want_recon = eager
    half = _cast(unet, dtype)
    got = invert(denoiser(half), latent())
    assert got.z_T.dtype == torch.float32 and all(n is None or n.dtype == torch.float32 for n in got.noises)
    assert got.model_calls == want.model_calls
    z_tol, recon_tol = HALF_TOL[dtype]
    assert rel(got.z_T, want.z_T) < z_tol
    assert rel(renoise.sample(denoiser(half), got), want_recon) < recon_tol


def _cast(unet, dtype):
    with torch.device("meta"):
        out = UNet(unet.config)
    out.load_state_dict({k: v.to(dtype) for k, v in unet.state_dict().items()}, assign=True)
    return out.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graphs_equal_eager(unet, dtype):
    """Every step captured as a CUDA graph (reduce-overhead) and replayed: eager's numbers and calls."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = _cast(unet, dtype).cuda()
    want = invert(denoiser(gpu, device="cuda"), latent(device="cuda"))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    den = denoiser(gpu, device="cuda")
    got = invert(den, latent(device="cuda"), compile="cuda-graphs")
    assert_same_inversion(got, want, tol)
    assert den.calls == want.model_calls
    # a second image replays the recorded graphs; the first result stays valid (outputs are cloned)
    first = got.z_T.clone()
    again = invert(denoiser(gpu, seed=1, device="cuda"), latent(seed=1, device="cuda"), compile="cuda-graphs")
    assert torch.equal(got.z_T, first)
    assert rel(again.z_T, invert(denoiser(gpu, seed=1, device="cuda"), latent(seed=1, device="cuda")).z_T) < tol


def test_warm_started_plans_trace_and_regions_have_room_for_many_specialisations(unet):
    """A warm-started (relaxed; extrapolated) plan gives eager's numbers in the compiled region; one process
    may run more step kinds than dynamo's default recompile limit (8) through the same fullgraph region."""
    z0 = latent()
    for k in (1, 2, 3):              # 3 plans x (first, main) x (cold first step, warm later) > 8 variants
        plan = PLAN.replace(iters=k, window=(k, k + 1), first_iters=k, first_window=(k - 1, k + 1),
                            warm_start=("previous", "extrapolate", "previous-noise")[k - 1],
                            relax=1.5 if k == 2 else 1.0)
        if k == 2:                   # extrapolation acts on deterministic steps
            plan = plan.replace(sampler="ddim", noise_correction="none")
        run = [renoise.invert(denoiser(unet), z0, SCHEDULE, plan.sampler, plan.num_steps, plan,
                              generator=torch.Generator().manual_seed(1), compile=c) for c in (None, "trace")]
        assert_same_inversion(run[1], run[0], 1e-6)


def test_compiled_tolerance_freezes_without_stopping(unet):
    """With tol, the compiled step freezes converged samples like eager but runs all K + 1 calls
    (no data-dependent exit): the same z_T, at least as many calls."""
    z0 = torch.cat([latent(0), latent(1)])
    den = denoiser(unet)
    den.cond = Conditioning(*(v.expand(2, *v.shape[1:]) for v in den.cond._fields()))
    plan = PLAN.replace(iters=6, window=(6, 7), first_iters=6, first_window=(6, 7), average=False, reg_rounds=0)
    full = renoise.invert(den, z0, SCHEDULE, plan.sampler, plan.num_steps, plan, generator=torch.Generator())
    plan = plan.replace(tol=float(torch.stack([r[2] for r in full.residuals]).median()))
    run = [renoise.invert(den, z0, SCHEDULE, plan.sampler, plan.num_steps, plan,
                          generator=torch.Generator().manual_seed(1), compile=c) for c in (None, "trace")]
    assert rel(run[1].z_T, run[0].z_T) < 1e-6
    assert run[0].model_calls < full.model_calls == run[1].model_calls


def test_compiled_first_tol_and_best_point_noise_correction_equal_eager(unet):
    """first_tol (a 0-d tensor tolerance in the compiled step) and Anderson's best point under noise
    correction "clip" give eager's z_T and noises in the compiled region."""
    z0 = torch.cat([latent(0), latent(1)])
    den = denoiser(unet)
    den.cond = Conditioning(*(v.expand(2, *v.shape[1:]) for v in den.cond._fields()))
    plan = PLAN.replace(iters=4, window=(4, 5), first_iters=4, first_window=(4, 5), average=False, reg_rounds=0,
                        anderson=2, tol=1e-2, first_tol=1e-4, noise_correction="clip")
    run = [renoise.invert(den, z0, SCHEDULE, plan.sampler, plan.num_steps, plan,
                          generator=torch.Generator().manual_seed(1), compile=c) for c in (None, "trace")]
    assert rel(run[1].z_T, run[0].z_T) < 1e-6
    for a, b in zip(run[1].noises, run[0].noises):
        assert (a is None) == (b is None) and (a is None or rel(a, b) < 1e-6)
