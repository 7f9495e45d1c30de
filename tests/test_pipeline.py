"""renoise.pipeline on tiny random-weight SD-like and SDXL-like folders in the diffusers layout.

Parity: prompt encoding (SD, SDXL: embeddings, pooled, time ids, zeroed negatives) and the
guided denoiser (input scaling, CFG in one doubled-batch UNet call) equal diffusers'
StableDiffusion(XL)Pipeline on the same folder. End to end: invert -> reconstruct -> edit.
"""
import pytest
import torch

from renoise import pipeline as rp
from renoise.models import load_pipeline
from renoise.schedules import Schedule

import tiny_pipeline

PROMPTS = ["a cat photo", "a tiger, photo!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pipeline.shared(tmp_path_factory)


@pytest.fixture(scope="module")
def ours(folders):
    return {k: load_pipeline(str(v), dtype=torch.float32, device="cpu") for k, v in folders.items()}


@pytest.fixture(scope="module")
def theirs(folders):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return {"sd": StableDiffusionPipeline.from_pretrained(str(folders["sd"])),
            "sdxl": StableDiffusionXLPipeline.from_pretrained(str(folders["sdxl"]))}


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err < tol, err


# ---------------------------------------------------------------------------------------------
# parity with diffusers

@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd_prompt_encoding_matches_diffusers(ours, theirs, clip_skip):
    cond = rp.encode_prompts(ours["sd"], PROMPTS, clip_skip=clip_skip)
    uncond = rp.negative_conditioning(ours["sd"], None, cond, clip_skip=clip_skip)
    ref = theirs["sd"]
    with torch.no_grad():
        if clip_skip is None:
            pe, npe = ref.encode_prompt(PROMPTS, "cpu", 1, True, None)
        else:   # diffusers' clip-skip rule written out: its code reaches for transformers 4's `.text_model`
            def skipped(texts):
                ids = ref.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
                hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
                return ref.text_encoder.final_layer_norm(hidden)
            pe, npe = skipped(PROMPTS), skipped([""] * len(PROMPTS))
    close(cond.context, pe)
    close(uncond.context, npe)
    assert cond.text_embeds is None and cond.time_ids is None
    if clip_skip is None:                  # prompts past 77 tokens are truncated, as diffusers does
        long = ["a tiger photo, " * 40]
        with torch.no_grad():
            close(rp.encode_prompts(ours["sd"], long).context, ref.encode_prompt(long, "cpu", 1, False)[0])


@pytest.mark.parametrize("negative", [None, ["a dog", ""]])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sdxl_prompt_encoding_matches_diffusers(ours, theirs, negative, clip_skip):
    size = (48, 64)
    cond = rp.encode_prompts(ours["sdxl"], PROMPTS, size=size, clip_skip=clip_skip)
    uncond = rp.negative_conditioning(ours["sdxl"], negative, cond, size=size, clip_skip=clip_skip)
    with torch.no_grad():
        pe, npe, pooled, npooled = theirs["sdxl"].encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, clip_skip=clip_skip)
    close(cond.context, pe)
    close(cond.text_embeds, pooled)
    if negative is None:                           # force_zeros_for_empty_prompt
        assert torch.all(uncond.context == 0) and torch.all(uncond.text_embeds == 0)
        assert torch.all(npe == 0)
    elif clip_skip is None:
        close(uncond.context, npe)
        close(uncond.text_embeds, npooled)
    else:   # diffusers 0.42 ignores clip_skip for SDXL negatives (hidden_states[-2]); we skip in both
        with torch.no_grad():
            npe_skipped, *_ = theirs["sdxl"].encode_prompt(negative, device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False, clip_skip=clip_skip)
        close(uncond.context, npe_skipped)
    proj = theirs["sdxl"].text_encoder_2.config.projection_dim
    ids = theirs["sdxl"]._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=proj)
    assert torch.equal(cond.time_ids, ids.expand(2, 6))
    assert torch.equal(uncond.time_ids, cond.time_ids)


def diffusers_guided(pipe, scheduler, x, t, pe, npe, g, added=None):
    """diffusers' own denoising-loop body: scale the input, one UNet call on [uncond; cond]."""
    xin = scheduler.scale_model_input(torch.cat([x, x]), t)
    kwargs = {"added_cond_kwargs": added} if added else {}
    with torch.no_grad():
        out = pipe.unet(xin, t, encoder_hidden_states=torch.cat([npe, pe]), **kwargs).sample
    u, c = out.chunk(2)
    return u + g * (c - u)


@pytest.mark.parametrize("kind,sampler", [("sd", "ddim"), ("sdxl", "euler_ancestral")])
def test_guided_denoiser_matches_diffusers(ours, theirs, kind, sampler, rng):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
    pipe, ref = ours[kind], theirs[kind]
    size = (32, 48)
    cls = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}[sampler]
    scheduler = cls.from_config(ref.scheduler.config)
    scheduler.set_timesteps(4)
    schedule = Schedule.from_config(pipe.scheduler_config)
    t = scheduler.timesteps[1]
    x = torch.randn(2, 4, 4, 6, generator=rng) * 3
    g = 4.5
    cond = rp.encode_prompts(pipe, PROMPTS, size=size)
    uncond = rp.negative_conditioning(pipe, ["a dog", "a cat"], cond, size=size)
    den = rp.guided_denoiser(pipe.unet, schedule, sampler, cond, uncond, g)
    with torch.no_grad():
        if kind == "sd":
            pe, npe = ref.encode_prompt(PROMPTS, "cpu", 1, True, ["a dog", "a cat"])
            expected = diffusers_guided(ref, scheduler, x, t, pe, npe, g)
        else:
            pe, npe, pooled, npooled = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True,
                                                         negative_prompt=["a dog", "a cat"])
            ids = ref._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                        text_encoder_projection_dim=ref.text_encoder_2.config.projection_dim)
            added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": ids.repeat(4, 1)}
            expected = diffusers_guided(ref, scheduler, x, t, pe, npe, g, added)
        got = den(x, t)
    close(got, expected)
    assert den.calls == 1
    # stacked batches (the inversion's reference-noise batch): conditioning tiled, same per part
    with torch.no_grad():
        stacked = den(torch.cat([x, 0.5 * x]), t)
        close(stacked[:2], got, 1e-5)
        close(stacked[2:], den(0.5 * x, t), 1e-5)
    with pytest.raises(ValueError, match="whole multiple"):
        den(x[:1], t)


@pytest.mark.parametrize("dim", [16, 15])
def test_lcm_guidance_embedding_matches_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline
    w = torch.tensor([0.0, 0.5, 7.5])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    close(rp.guidance_embedding(w, dim), expected, 1e-6)


def test_lcm_unet_gets_guidance_embedding_not_cfg(tmp_path, rng):
    """A full LCM checkpoint (time_cond_proj_dim): guidance goes in as timestep_cond, one batch."""
    from diffusers import LatentConsistencyModelPipeline
    from renoise.models import load_unet
    from tiny_models import save_tiny_unet
    ref = save_tiny_unet(tmp_path / "unet", "lcm")
    unet = load_unet(tmp_path / "unet", subfolder=None)
    schedule = Schedule.create()
    cond = rp.Conditioning(torch.randn(2, 77, 32, generator=rng))
    x = torch.randn(2, 4, 8, 8, generator=rng)
    den = rp.guided_denoiser(unet, schedule, "lcm", cond, None, 8.0)
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((2,), 7.0), 16)
    with torch.no_grad():
        expected = ref(x, 499, encoder_hidden_states=cond.context, timestep_cond=w_emb).sample
        close(den(x, 499), expected)


def test_no_cfg_at_guidance_one_or_below(ours, rng):
    pipe = ours["sd"]
    schedule = Schedule.from_config(pipe.scheduler_config)
    cond = rp.encode_prompts(pipe, PROMPTS)
    x = torch.randn(2, 4, 4, 4, generator=rng)
    with torch.no_grad():
        plain = pipe.unet(x, 500, cond.context)
        for g in (0.0, 1.0):
            close(rp.guided_denoiser(pipe.unet, schedule, "ddim", cond, None, g)(x, 500), plain, 1e-6)
    with pytest.raises(ValueError, match="needs an unconditional"):
        rp.guided_denoiser(pipe.unet, schedule, "ddim", cond, None, 2.0)


def test_prompt_counts():
    assert rp.as_prompts("a cat", 3) == ["a cat"] * 3
    assert rp.as_prompts(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        rp.as_prompts(["a", "b"], 3)


def test_sdxl_needs_size(ours):
    with pytest.raises(ValueError, match="image size"):
        rp.encode_prompts(ours["sdxl"], PROMPTS)


def test_vae_sample_and_mean(ours, rng):
    pipe = ours["sd"]
    images = torch.rand(2, 3, 32, 48, generator=rng) * 2 - 1
    mean = rp.encode_images(pipe, images, sample=False)
    assert mean.shape == (2, 4, 4, 6) and mean.dtype == torch.float32
    a = rp.encode_images(pipe, images, torch.Generator().manual_seed(1))
    b = rp.encode_images(pipe, images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    assert rp.decode_latents(pipe, mean).shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="multiple of 8"):
        rp.encode_images(pipe, images[..., :30], sample=False)


# ---------------------------------------------------------------------------------------------
# end to end: invert -> reconstruct -> edit

# the last step (t_next = None) is deterministic: its answer reproduces z0 only where the
# fixed point is reached, i.e. without the regularizer and averaging, with enough iterations
CONVERGED = dict(reg_rounds=0, iters=12, window=(12, 13), first_iters=12, first_window=(12, 13))


def images(batch, h, w, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# On 4x6 latents the auto-correlation step (gradient ~ 8·var(e)/N per element, N = h·w) diverges
# once CFG scales the output up; real latents (N = 4096) are far from that: KL only with CFG here.
@pytest.mark.parametrize("guidance,overrides", [(0.0, {}), (3.0, {"lambda_ac": 0.0})])
def test_sdxl_turbo_invert_reconstruct_edit(ours, guidance, overrides):
    """The sdxl-turbo preset (regularizer on; with CFG > 1 the reference batch is stacked under
    CFG) with override noise correction: each stochastic denoising step, fed the inverted latent
    and its stored noise, lands exactly on the next inverted latent."""
    from renoise.samplers import euler_ancestral
    editor = rp.Editor(ours["sdxl"], "sdxl-turbo", guidance_scale=guidance,
                       plan_overrides={"noise_correction": "override", **overrides})
    assert editor.plan.regularize
    inv = editor.invert(images(2, 32, 48), PROMPTS, generator=torch.Generator().manual_seed(7865))
    res = inv.result
    assert res.z_T.shape == (2, 4, 4, 6) and res.num_steps == 4 and res.sampler == "euler_ancestral"
    assert inv.size == (32, 48) and inv.prompts == PROMPTS and inv.guidance_scale == guidance
    assert len(res.noises) == 4 and res.noises[-1] is None and all(n.shape == (2, 4, 4, 6) for n in res.noises[:3])
    assert res.model_calls == 4 + 3 * 10 + 3     # K+1 per step (t=249: K=3; others K=9) + 3 noise corrections
    den = editor.denoiser(PROMPTS, inv.size, guidance_scale=guidance)
    for i, (t, tn) in enumerate(res.chain[:3]):  # denoising order; trajectory is in inversion order
        x = res.trajectory[4 - i]
        x_next = euler_ancestral.step(x, den(x, t), t, tn, res.schedule, noise=res.noises[i])
        assert rel(x_next, res.trajectory[3 - i]) < 2e-6, i
    rec = editor.reconstruct(inv)
    edit = editor.edit(inv, "a tiger")
    assert rec.shape == edit.shape == (2, 3, 32, 48)
    assert rec.min() >= -1 and rec.max() <= 1
    assert not torch.allclose(rec, edit)


# stochastic steps (t >= 300) left unconverged (K = 1, averaging both iterates), the final
# deterministic step (t = 249 / 259 / 1) converged: override noise correction must absorb the mismatch
UNCONVERGED_THEN_CONVERGED = dict(reg_rounds=0, iters=1, window=(0, 2), first_iters=12, first_window=(12, 13),
                                  first_until=300)


@pytest.mark.parametrize("kind,preset,opts", [("sdxl", "sdxl-turbo", None), ("sd", "lcm-lora", None),
                                             ("sd", "sd15", {"eta": 1.0})])
def test_override_reconstruction_is_exact(ours, kind, preset, opts):
    """Every stochastic sampler (Euler-ancestral, LCM, DDIM with eta > 0)."""
    plan = dict(UNCONVERGED_THEN_CONVERGED, num_steps=4)
    editor = rp.Editor(ours[kind], preset, sampler_opts=opts, plan_overrides={**plan, "noise_correction": "override"})
    inv = editor.invert(images(1, 32, 48), "a cat photo", generator=torch.Generator().manual_seed(0))
    assert sum(n is not None for n in inv.result.noises) >= 3          # DDIM, eta > 0: the last step too
    z, den = editor.sample(inv)
    # fp32 rounding of a chain through z_T, amplified up to 1/√ᾱ(999) = 14.6 by the first step's x0 estimate
    err = (z - inv.z0).abs().max()
    assert err < 15 * 2**-23 * 8 * inv.result.z_T.abs().max(), err
    assert den.calls == 4
    # without noise correction the stored random noises do not bring the chain back
    plain = rp.Editor(ours[kind], preset, sampler_opts=opts, plan_overrides={**plan, "noise_correction": "none"})
    inv2 = plain.invert(images(1, 32, 48), "a cat photo", generator=torch.Generator().manual_seed(0))
    assert (plain.sample(inv2)[0] - inv2.z0).abs().max() > 100 * err


def test_sd_ddim_converged_inversion_reconstructs(ours):
    """DDIM is deterministic: a converged inversion reconstructs z0 (no noise correction needed)."""
    editor = rp.Editor(ours["sd"], "sd15", num_steps=5, plan_overrides=CONVERGED)
    inv = editor.invert(images(2, 32, 48), PROMPTS, generator=torch.Generator().manual_seed(0))
    assert all(n is None for n in inv.result.noises)
    z, _ = editor.sample(inv)
    err = rel(z, inv.z0)
    assert err < 1e-4
    plain = rp.Editor(ours["sd"], "sd15", num_steps=5, plan_overrides=dict(CONVERGED, iters=0, window=(0, 1),
                                                                           first_iters=0, first_window=(0, 1)))
    inv0 = plain.invert(images(2, 32, 48), PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rel(plain.sample(inv0)[0], inv0.z0) > 30 * err          # plain DDIM inversion
    rec, edit = editor.reconstruct(inv), editor.edit(inv, ["a dog", "a tiger"], edit_guidance_scale=2.0)
    assert rec.shape == edit.shape == (2, 3, 32, 48)


def test_edit_is_the_papers_protocol(ours):
    """edit = denoise z_T with the stored noises, the edit prompt, the SOURCE prompt as negative,
    the edit guidance scale."""
    from renoise.inversion import sample
    editor = rp.Editor(ours["sdxl"], "sdxl-turbo", plan_overrides={"lambda_ac": 0.0})
    inv = editor.invert(images(2, 32, 32), PROMPTS, generator=torch.Generator().manual_seed(1))
    size = (32, 32)
    cond = rp.encode_prompts(ours["sdxl"], ["a dog", "a tiger"], size=size)
    source = rp.encode_prompts(ours["sdxl"], PROMPTS, size=size)
    den = rp.guided_denoiser(ours["sdxl"].unet, inv.result.schedule, "euler_ancestral", cond, source, 3.0)
    expected = rp.decode_latents(ours["sdxl"], sample(den, inv.result))
    assert torch.equal(editor.edit(inv, ["a dog", "a tiger"], edit_guidance_scale=3.0), expected)
    # guidance 1 (the default): the edit prompt alone
    den1 = rp.guided_denoiser(ours["sdxl"].unet, inv.result.schedule, "euler_ancestral", cond)
    assert torch.equal(editor.edit(inv, ["a dog", "a tiger"]), rp.decode_latents(ours["sdxl"], sample(den1, inv.result)))


def test_sd_preset_with_regularizer_runs(ours):
    editor = rp.Editor(ours["sd"], "sd15", num_steps=5)
    inv = editor.invert(images(1, 64, 48), "a cat photo", generator=torch.Generator().manual_seed(0))
    assert inv.result.model_calls == 5 * 2 and torch.isfinite(inv.result.z_T).all()
    assert editor.edit(inv, "a tiger").shape == (1, 3, 64, 48)


def test_strength_inverts_part_of_the_chain(ours):
    editor = rp.Editor(ours["sdxl"], "sdxl-turbo", strength=0.5,
                       plan_overrides={**CONVERGED, "noise_correction": "override"})
    inv = editor.invert(images(1, 32, 32), "a cat", generator=torch.Generator().manual_seed(0))
    assert inv.result.start == 2 and inv.result.timesteps.tolist() == [499, 249]
    z, den = editor.sample(inv)
    assert den.calls == 2 and rel(z, inv.z0) < 1e-5
    full = rp.Editor(ours["sdxl"], "sdxl-turbo", plan_overrides={**CONVERGED, "noise_correction": "override"})
    assert full.invert(images(1, 32, 32), "a cat", generator=torch.Generator().manual_seed(0)).result.start == 0


def test_other_step_count_refused(ours):
    editor = rp.Editor(ours["sd"], "sd15", num_steps=3, plan_overrides=CONVERGED)
    inv = editor.invert(images(1, 32, 32), "a cat", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="invert again with 5 steps"):
        editor.reconstruct(inv, num_steps=5)
    assert editor.reconstruct(inv, num_steps=3).shape == (1, 3, 32, 32)


def test_batch_equals_single_images(ours):
    """Per-image prompts and conditioning line up with the images of a batch."""
    editor = rp.Editor(ours["sd"], "sd15", num_steps=4, plan_overrides=dict(CONVERGED, iters=2, window=(2, 3)))
    x = images(2, 32, 32)
    both = editor.invert(x, PROMPTS, sample_posterior=False)
    edit_both = editor.edit(both, ["a dog", "a tiger"], edit_guidance_scale=3.0)
    for i in range(2):
        one = editor.invert(x[i:i + 1], PROMPTS[i], sample_posterior=False)
        assert rel(one.result.z_T[0], both.result.z_T[i]) < 1e-5
        edit_one = editor.edit(one, ["a dog", "a tiger"][i], edit_guidance_scale=3.0)
        assert rel(edit_one[0], edit_both[i]) < 1e-5


def test_saved_inversion_serves_edits(ours, tmp_path):
    editor = rp.Editor(ours["sdxl"], "sdxl-turbo", plan_overrides={"lambda_ac": 0.0})
    inv = editor.invert(images(1, 32, 48), "a cat", generator=torch.Generator().manual_seed(3))
    inv.save(tmp_path / "inv.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.safetensors"]      # one file
    loaded = rp.Inversion.load(tmp_path / "inv.safetensors")
    assert loaded.prompts == ["a cat"] and loaded.size == (32, 48) and loaded.num_steps == 4
    assert torch.equal(loaded.z0, inv.z0)
    # a fresh editor with another preset: the inversion carries its own sampler, schedule and plan
    other = rp.Editor(ours["sdxl"], "sd15")
    assert torch.equal(other.edit(loaded, "a tiger"), editor.edit(inv, "a tiger"))
    with pytest.raises(FileNotFoundError, match="inversion file not found"):
        rp.Inversion.load(tmp_path / "missing.safetensors")
    inv.result.save(tmp_path / "bare.safetensors")       # the solver's file, without the pipeline settings
    with pytest.raises(ValueError, match="not the pipeline settings"):
        rp.Inversion.load(tmp_path / "bare.safetensors")
