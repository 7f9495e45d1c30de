"""The trained demo model shipped in the package: it loads offline, diffusers loads the same folder,
and it does what the README says — its generations follow their captions, its VAE round-trips
held-out scenes, ReNoise inverts them better than plain inversion, and edits change what the edit
prompt names while keeping the background."""
import json

import numpy as np
import pytest
import torch

from renoise.demo import MODEL_DIR, evaluate
from renoise.models import load_pipeline
from renoise.presets import Plan


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("demo")


def test_ships_as_small_fp16_safetensors_in_the_diffusers_layout():
    from safetensors import safe_open
    files = sorted(p for p in MODEL_DIR.rglob("*") if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert sum(p.stat().st_size for p in files) <= 15 * 2 ** 20
    for p in weights:
        with safe_open(str(p), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, p
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (MODEL_DIR / "tokenizer" / name).is_file()
    assert (MODEL_DIR / "README.md").is_file()


def test_loads_by_name_with_no_network(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_pipeline("demo")
    assert again.kind == "sd" and again.unet.config.sample_size == 16
    assert again.scheduler_config["prediction_type"] == "epsilon"


def test_diffusers_generates_the_same_images_from_the_same_latents(pipe):
    diffusers = pytest.importorskip("diffusers")
    from renoise.generate import generate, initial_latents
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    prompts = [evaluate.held_out(i).caption for i in range(2)]
    latents = initial_latents(pipe, 2, (128, 128), torch.Generator().manual_seed(3))
    ours = generate(pipe, prompts, num_steps=8, guidance_scale=4.0, latents=latents)
    out = theirs(prompts, num_inference_steps=8, guidance_scale=4.0, latents=latents.clone(), output_type="pt",
                 height=128, width=128).images * 2 - 1
    rel = (ours - out.clamp(-1, 1)).abs().max() / out.abs().max()
    assert rel < 1e-4, rel


def test_vae_round_trips_held_out_scenes_at_30_db(pipe):
    psnr = evaluate.vae_psnr(pipe, 16)
    assert psnr.median() >= 30.0, psnr


def test_generations_follow_their_captions(pipe):
    result = evaluate.follows_caption(pipe, 64, num_steps=20, guidance_scale=4.0)
    assert result["colour"] >= 0.9, result["colour"]
    assert result["shape"] >= 0.7, result["shape"]


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddim", 10), ("ddim", 50), ("euler_ancestral", 4)])
def test_renoise_reconstructs_better_than_plain_inversion(pipe, sampler, steps):
    nc = {"noise_correction": "optimize"} if sampler == "euler_ancestral" else {}
    plain = Plan(name="plain", sampler=sampler, num_steps=steps, **nc)
    renoise = plain.replace(name="renoise", iters=3, window=(3, 4))
    kw = dict(sampler=sampler, num_steps=steps)
    a = evaluate.reconstruction(pipe, plain, 8, **kw)
    b = evaluate.reconstruction(pipe, renoise, 8, **kw)
    assert b["calls"] > a["calls"]
    assert b["psnr"].median() > a["psnr"].median() + 0.5, (a["psnr"], b["psnr"])


def test_colour_edit_changes_the_shape_and_keeps_the_background(pipe):
    result = evaluate.colour_edits(pipe, "demo", 32)
    assert result["success"] >= 0.8, result["success"]
    assert np.median(result["background_psnr"]) >= 25.0, result["background_psnr"]


def test_main_job_runs_offline_on_the_demo_model_by_default(tmp_path, capsys, monkeypatch):
    """The README's first command: no --model, so the demo model; it edits and reconstructs."""
    from pathlib import Path

    from renoise.__main__ import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = Path(__file__).resolve().parents[1] / "examples" / "scene.png"
    code = main(["edit", "--image", str(example), "--prompt", "a large red circle in the center on a blue background",
                 "--edit-prompt", "a large green circle in the center on a blue background", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "demo model" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "demo" and report["device"] == "cpu" and report["dtype"] == "float32"
    contraction = report["residuals"]["contraction_per_step"]     # NaN where tol stopped a step after one call
    calls = [len(r) for r in report["residuals"]["per_iteration"]]
    assert len(contraction) == 10 and max(calls) > 1 and sum(calls) < 40         # the demo preset's tol stops
    for c, n in zip(contraction, calls):
        c = np.asarray(c, dtype=float)                                  # JSON null (NaN) -> nan
        assert (np.isfinite(c).all() and (c > 0).all()) if n > 1 else np.isnan(c).all()
    assert (tmp_path / "scene_edit.png").is_file() and (tmp_path / "scene_reconstruction.png").is_file()
    from renoise import images
    from renoise.demo.checks import dominant_colour
    from renoise.demo.scenes import Scene, Shape, shape_masks
    edited = (images.load_images([tmp_path / "scene_edit.png"])[0] + 1) / 2
    mask = shape_masks(Scene((Shape("circle", "red", "large", "center", dx=0.01, dy=-0.01),), ("blue",)))[0]
    assert dominant_colour(edited, mask > 0.99) == "green"


def test_shape_edit_turns_circles_into_squares(pipe):
    result = evaluate.colour_edits(pipe, "demo", 16, target="red", target_kind="square")
    assert result["success"] >= 0.8, result["success"]
    assert np.median(result["background_psnr"]) >= 25.0, result["background_psnr"]


def test_demo_preset_matches_k9_with_a_third_of_its_calls(pipe):
    """Issue 14's goal at the demo preset's 10 DDIM steps: plain K = 9's median reconstruction with
    at most a third of its UNet calls (warm start, Anderson, relax, tolerance stopping)."""
    k9 = Plan(name="K9", sampler="ddim", num_steps=10, iters=9, window=(9, 10), average=False)
    a = evaluate.reconstruction(pipe, k9, 8, sampler="ddim", num_steps=10)
    b = evaluate.reconstruction(pipe, "demo", 8)
    assert b["calls"] <= a["calls"] / 3, (a["calls"], b["calls"])       # the batch's calls: its slowest sample's
    assert b["psnr"].median() >= a["psnr"].median() - 0.1, (a["psnr"], b["psnr"])
    assert b["latent_psnr"].median() >= a["latent_psnr"].median(), (a["latent_psnr"], b["latent_psnr"])


@pytest.mark.parametrize("preset", ["demo-4", "demo-euler-4"])
def test_four_step_presets_match_k9_with_a_fraction_of_its_calls(pipe, preset):
    """The same goal at 4 steps: DDIM (demo-4) and Euler-ancestral with noise correction
    (demo-euler-4), each image's calls against K = 9's (noise correction's calls included). Both trade
    some of it for issue 20's rule off home ground (never 0.5 dB below plain iteration at equal calls):
    demo-4's tol went from 2e-2 to 1.5e-2 (at most 40 % of K = 9's calls here, not a third);
    demo-euler-4 went from <= 3 calls a step, started relaxed (14 of 43) to demo's solver as it is (about
    20 of 43), then (2026-12-07) to noise correction "clip" with its first step solved to 1e-5: an exact
    chain (latent PSNR at fp32 round-off, about 120-142 dB) with about 25 of 43, under 0.6."""
    plan = Plan.preset(preset)
    k9 = plan.replace(name="K9", iters=9, window=(9, 10), anderson=0, relax=1.0, tol=None, first_tol=None,
                      tol_plain=None, warm_start="none")
    a = evaluate.reconstruction(pipe, k9, 8)
    b = evaluate.reconstruction(pipe, plan, 8)
    assert (a["sample_calls"] == a["calls"]).all() and a["calls"] == 40 + 3 * (plan.noise_correction != "none")
    share = 0.4 if preset == "demo-4" else 0.6
    assert b["sample_calls"].float().median() <= a["calls"] * share, (a["calls"], b["sample_calls"])
    assert b["psnr"].median() >= a["psnr"].median() - 0.1, (a["psnr"], b["psnr"])
    assert b["latent_psnr"].median() >= a["latent_psnr"].median(), (a["latent_psnr"], b["latent_psnr"])
