"""`python -m renoise invert | reconstruct | edit` on tiny SD-like / SDXL-like folders.

The CLI runs in-process through `renoise.__main__.main(argv)`; one test runs it as a subprocess.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renoise import images as imgs
from renoise.__main__ import main
from renoise.models import load_pipeline
from renoise.pipeline import Editor, Inversion

import tiny_pipeline

FAST_SD = ["--steps", "4"]           # the sd15 preset's 50 steps are not needed to test the plumbing
SD_PX = 64                           # 8x8 latents: the auto-correlation regularizer is unstable on 4x4 ones


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_pipeline.shared(tmp_path_factory)


def picture(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(*argv):
    return main([str(a) for a in argv] + ["--quiet"])


def files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_edit_one_command(folders, tmp_path, monkeypatch):
    """The README's main job: one command from an image file to an edited image."""
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path))          # no LPIPS weights anywhere
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cat = picture(tmp_path / "cat.png", 40, 52)
    out = tmp_path / "out"
    assert run("edit", "--model", folders["sdxl"], "--image", cat, "--prompt", "a cat",
               "--edit-prompt", "a tiger", "--out", out) == 0
    assert files(out) == ["cat_edit.png", "cat_reconstruction.png", "inversion.safetensors", "report.json"]
    for name in ("cat_edit.png", "cat_reconstruction.png"):
        with Image.open(out / name) as im:
            assert im.size == (48, 40) and im.mode == "RGB"      # 52 px wide centre-cropped to 48
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "edit" and report["kind"] == "sdxl" and report["preset"] == "sdxl-turbo"
    assert report["device"] == "cpu" and report["dtype"] == "float32"         # --device/--dtype auto on a CPU
    assert report["outputs"] == ["cat_reconstruction.png", "cat_edit.png"]
    assert report["inversion"] == "inversion.safetensors"
    assert report["model_calls"] == {"inversion": 4 + 3 * 10 + 3, "reconstruction": 4, "edit": 4}
    settings = report["settings"]
    assert settings["sampler"] == "euler_ancestral" and settings["num_steps"] == 4
    assert settings["prompts"] == ["a cat"] and settings["edit_prompts"] == ["a tiger"]
    assert settings["edit_guidance_scale"] == 1.0 and settings["guidance_scale"] == 0.0
    assert settings["size"] == [40, 48] and settings["inverted_timesteps"] == [999, 749, 499, 249]
    assert settings["plan"]["noise_correction"] == "optimize"
    assert [len(r) for r in report["residuals"]["final_per_step"]] == [1] * 4
    assert [len(r) for r in report["residuals"]["per_iteration"]] == [4, 10, 10, 10]
    assert set(report["timings"]) == {"load", "inversion", "reconstruction", "edit", "total"}
    for key in ("metrics", "metrics_vs_input"):                 # the reconstruction's, the edit's
        m = report[key]
        assert len(m["image"]["psnr"]) == len(m["image"]["ssim"]) == 1 and set(m["latent"]) == {"rmse", "psnr", "ssim"}
        assert m["image"]["lpips"] is None and "never downloads" in m["image"]["lpips_note"]
    # the reconstruction is the source prompt's denoising of the saved inversion
    pipe = load_pipeline(str(folders["sdxl"]))
    inv = Inversion.load(out / "inversion.safetensors")
    api = np.asarray(imgs.to_pil(Editor(pipe, inv.result.plan).reconstruct(inv))[0]).astype(int)
    assert np.abs(api - np.asarray(Image.open(out / "cat_reconstruction.png"))).max() <= 1   # fp32 rounding
    from renoise import metrics
    x, y = imgs.load_images([out / "cat_reconstruction.png", cat], size=(40, 48))
    assert report["metrics"]["image"]["psnr"][0] == pytest.approx(metrics.psnr(x[None], y[None]).item(), abs=0.05)


def test_one_inversion_serves_many_edits(folders, tmp_path):
    cat = picture(tmp_path / "cat.png", SD_PX, SD_PX)
    assert run("invert", "--model", folders["sd"], "--image", cat, "--prompt", "a cat", *FAST_SD,
               "--out", tmp_path / "inv") == 0
    assert files(tmp_path / "inv") == ["inversion.safetensors", "report.json"]
    report = json.loads((tmp_path / "inv" / "report.json").read_text())
    assert report["preset"] == "sd15" and report["model_calls"] == {"inversion": 8} and report["outputs"] == []
    saved = tmp_path / "inv" / "inversion.safetensors"
    for prompt, flags in (("a tiger", []), ("a dog", ["--no-reconstruction"])):
        out = tmp_path / prompt.replace(" ", "_")
        assert run("edit", "--model", folders["sd"], "--inversion", saved, "--edit-prompt", prompt,
                   "--edit-guidance", "2.5", "--out", out, *flags) == 0
        rep = json.loads((out / "report.json").read_text())
        assert "image" not in rep["metrics_vs_input"]                # no --image given: latent metrics only
        if flags:
            assert rep["model_calls"] == {"edit": 4} and rep["outputs"] == ["cat_edit.png"] and "metrics" not in rep
            assert files(out) == ["cat_edit.png", "report.json"]
        else:
            assert rep["model_calls"] == {"reconstruction": 4, "edit": 4}
            assert rep["outputs"] == ["cat_reconstruction.png", "cat_edit.png"]
            assert set(rep["metrics"]) == {"latent"}
    tiger, dog = (np.asarray(Image.open(tmp_path / d / "cat_edit.png")) for d in ("a_tiger", "a_dog"))
    assert tiger.shape == (SD_PX, SD_PX, 3) and not np.array_equal(tiger, dog)
    # the same edit through the API, from the same file
    pipe = load_pipeline(str(folders["sd"]))
    inv = Inversion.load(saved)
    api = Editor(pipe, inv.result.plan).edit(inv, "a tiger", edit_guidance_scale=2.5)
    assert np.array_equal(np.asarray(imgs.to_pil(api)[0]), tiger)


def test_reconstruction_exact_with_override(folders, tmp_path):
    """Every plan field is a flag: unconverged stochastic steps + override noise correction + a
    converged last step reconstruct the latent to fp32 rounding."""
    cat = picture(tmp_path / "cat.png", 32, 48)
    out = tmp_path / "out"
    assert run("reconstruct", "--model", folders["sdxl"], "--image", cat, "--prompt", "a cat", "--out", out,
               "--noise-correction", "override", "--reg-rounds", "0", "--iters", "1", "--window", "0,2",
               "--first-iters", "12", "--first-window", "12,13") == 0
    assert files(out) == ["cat_reconstruction.png", "inversion.safetensors",
                          "report.json"]
    report = json.loads((out / "report.json").read_text())
    plan = report["settings"]["plan"]
    assert plan["noise_correction"] == "override" and plan["window"] == [0, 2] and plan["first_iters"] == 12
    assert report["metrics"]["latent"]["psnr"][0] > 80            # z0' vs z0, range of z0
    # the image metrics compare the decoded output with the (cropped) input; a random VAE decodes badly
    from renoise import metrics
    x, y = imgs.load_images([out / "cat_reconstruction.png", cat])
    assert report["metrics"]["image"]["psnr"][0] == pytest.approx(metrics.psnr(x[None], y[None]).item(), abs=0.05)
    assert report["metrics"]["image"]["ssim"][0] == pytest.approx(metrics.ssim(x[None], y[None]).item(), abs=0.01)


def test_batch_of_images_and_prompts(folders, tmp_path, monkeypatch):
    from test_metrics import save_random_lpips
    (tmp_path / "lpips").mkdir()
    save_random_lpips(tmp_path / "lpips", torch.Generator().manual_seed(0))
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path / "lpips"))
    a, b = picture(tmp_path / "a.png", SD_PX, SD_PX, 1), picture(tmp_path / "b.png", SD_PX, SD_PX, 2)
    out = tmp_path / "out"
    assert run("edit", "--model", folders["sd"], "--image", a, "--image", b, "--prompt", "a cat",
               "--prompt", "a dog", "--edit-prompt", "a tiger", *FAST_SD, "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == ["a_reconstruction.png", "b_reconstruction.png", "a_edit.png", "b_edit.png"]
    for key in ("metrics", "metrics_vs_input"):
        lpips = report[key]["image"]["lpips"]                           # from the local (random) weights
        assert len(lpips) == 2 and all(v > 0 for v in lpips)
    assert report["settings"]["prompts"] == ["a cat", "a dog"]
    assert report["settings"]["edit_prompts"] == ["a tiger", "a tiger"]
    assert len(report["metrics_vs_input"]["image"]["psnr"]) == 2


def test_lora_merged_and_remembered_by_the_inversion(folders, tmp_path):
    from safetensors.torch import save_file
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "lora.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=g)}, str(lora))
    cat = picture(tmp_path / "cat.png", SD_PX, SD_PX)
    common = ["--model", folders["sd"], "--image", cat, "--prompt", "a cat", *FAST_SD]
    assert run("invert", *common, "--lora", lora, "--lora-scale", "0.5", "--out", tmp_path / "with") == 0
    assert run("invert", *common, "--out", tmp_path / "without") == 0
    reports = {k: json.loads((tmp_path / k / "report.json").read_text()) for k in ("with", "without")}
    assert reports["with"]["lora"] == str(lora) and reports["with"]["lora_scale"] == 0.5
    assert reports["without"]["lora"] is None
    z = {k: Inversion.load(tmp_path / k / "inversion.safetensors").result.z_T for k in ("with", "without")}
    assert not torch.allclose(z["with"], z["without"])
    # an edit of the saved inversion merges the same LoRA again by itself
    assert run("edit", "--model", folders["sd"], "--inversion", tmp_path / "with" / "inversion.safetensors",
               "--edit-prompt", "a tiger", "--out", tmp_path / "edit") == 0
    edit = json.loads((tmp_path / "edit" / "report.json").read_text())
    assert edit["lora"] == str(lora) and edit["lora_scale"] == 0.5


def bad_cases(tmp_path, folders):
    ok = picture(tmp_path / "ok.png", 32, 32)
    odd = picture(tmp_path / "odd.png", 33, 32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    common = ["--prompt", "a cat", "--edit-prompt", "a tiger"]
    sd = ["edit", "--model", folders["sd"], *FAST_SD]
    return {
        "unreadable image": ([*sd, "--image", broken, *common], "cannot read image"),
        "missing image": ([*sd, "--image", tmp_path / "nope.png", *common], "not found"),
        "wrong size": ([*sd, "--image", odd, "--fit", "none", *common], "not a multiple of 8"),
        "prompt count": ([*sd, "--image", ok, "--image", ok, "--image", ok, "--prompt", "a", "--prompt", "b",
                          "--edit-prompt", "c"], "got 2 prompts for 3 images"),
        "edit prompt count": ([*sd, "--image", ok, "--prompt", "a", "--edit-prompt", "b", "--edit-prompt", "c"],
                              "got 2 edit prompts for 1 images"),
        "unknown preset": ([*sd, "--image", ok, "--preset", "sdxl-hyper", *common], "unknown preset"),
        "missing model": (["edit", "--model", tmp_path / "no" / "model", "--image", ok, *common], "not found"),
        "bad plan field": ([*sd, "--image", ok, "--iters", "2", "--window", "5,3", *common], "window"),
        "bad strength": ([*sd, "--image", ok, "--strength", "1.5", *common], "strength"),
        "other step count": (["reconstruct", "--model", folders["sd"], "--inversion", "INV", "--steps", "7"],
                             "invert again"),
        "missing inversion": (["edit", "--model", folders["sd"], "--inversion", tmp_path / "none.safetensors",
                               "--edit-prompt", "x"], "inversion file not found"),
        "not an inversion": (["edit", "--model", folders["sd"], "--inversion", broken, "--edit-prompt", "x"],
                             "cannot read inversion file"),
        "no cuda": ([*sd, "--image", ok, *common, "--device", "cuda"], "CUDA is not available"),
        "bad device": ([*sd, "--image", ok, *common, "--device", "gpu0"], "--device 'gpu0'"),
    }


@pytest.fixture(scope="module")
def saved_inversion(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "inv"
    assert run("invert", "--model", folders["sd"], "--image", picture(out.parent / "x.png", SD_PX, SD_PX), *FAST_SD,
               "--out", out) == 0
    return out / "inversion.safetensors"


@pytest.mark.parametrize("case", ["unreadable image", "missing image", "wrong size", "prompt count",
                                  "edit prompt count", "unknown preset", "missing model", "bad plan field",
                                  "bad strength", "other step count", "missing inversion",
                                  "not an inversion", "no cuda", "bad device"])
def test_bad_input_clear_error_and_no_output(case, folders, saved_inversion, tmp_path, capsys):
    argv, message = bad_cases(tmp_path, folders)[case]
    argv = [saved_inversion if a == "INV" else a for a in argv]
    parent = tmp_path / "results"
    parent.mkdir()
    before = set(os.listdir(tmp_path))
    code = run(*argv, "--out", parent / "out")
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("renoise ")
    assert os.listdir(parent) == []                         # no output folder, no staged leftovers
    assert set(os.listdir(tmp_path)) == before


def test_out_must_be_a_folder(folders, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    code = run("invert", "--model", folders["sd"], "--image", picture(tmp_path / "x.png", 32, 32),
               "--out", tmp_path / "file")
    assert code == 2 and "not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


def test_help_lists_commands_and_plan_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--preset", "--steps", "--guidance", "--strength", "--edit-guidance", "--device",
                 "--dtype", "--seed", "--inversion", "--noise-correction", "--lambda-kl", "--first-window",
                 "--no-reconstruction", "--quiet"):
        assert flag in text
    assert main([]) != 0


def test_python_m_renoise_subprocess(folders, tmp_path):
    cat = picture(tmp_path / "cat.png", SD_PX, SD_PX)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "renoise", "reconstruct", "--model", str(folders["sd"]),
                           "--image", cat, "--prompt", "a cat", *FAST_SD, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert files(tmp_path / "out") == ["cat_reconstruction.png", "inversion.safetensors", "report.json"]
    assert "device cpu, dtype float32" in done.stderr
    rate = re.compile(r"<00:00, +[\d.?]+ ?\w*(/s|s/\w+)\]")  # tqdm: elapsed<ETA, rate (x/s or, when slow, s/x)
    for label in ("load", "inversion", "reconstruction"):
        assert any(line.startswith(label + ":") and rate.search(line)
                   for line in done.stderr.replace("\r", "\n").splitlines()), (label, done.stderr)
    assert str(tmp_path / "out" / "cat_reconstruction.png") in done.stdout
    assert "reconstruction PSNR: " in done.stdout and "model calls: inversion 8, reconstruction 4" in done.stdout


def test_quiet_prints_nothing_and_a_normal_run_prints_paths_and_psnr(folders, tmp_path, capfd):
    cat = picture(tmp_path / "cat.png", SD_PX, SD_PX)
    argv = ["edit", "--model", folders["sd"], "--image", cat, "--prompt", "a cat", "--edit-prompt", "a dog",
            *FAST_SD, "--seed", "1"]
    capfd.readouterr()
    assert main([str(a) for a in argv + ["--out", tmp_path / "quiet", "--quiet"]]) == 0
    assert capfd.readouterr() == ("", "")
    assert main([str(a) for a in argv + ["--out", tmp_path / "loud"]]) == 0
    out, err = capfd.readouterr()
    report = json.loads((tmp_path / "loud" / "report.json").read_text())
    for name in ("cat_reconstruction.png", "cat_edit.png", "inversion.safetensors", "report.json"):
        assert str(tmp_path / "loud" / name) in out
    psnr = report["metrics"]["image"]["psnr"][0]
    assert f"reconstruction PSNR: {psnr:.2f} dB (image)" in out
    assert "model calls: inversion 8, reconstruction 4, edit 4 (total 16)" in out
    assert f"total {report['timings']['total']:.1f}" in out
    assert "device cpu, dtype float32" in err and "inversion" in err and "edit" in err


def test_single_file_checkpoint_model(folders, tmp_path):
    """--model takes an original-layout (LDM) .safetensors file; with --config for the tiny
    architecture it gives the same reconstruction as the diffusers folder it was written from."""
    from safetensors.torch import save_file

    from renoise.models import single_file as sf
    pipe = load_pipeline(folders["sd"])
    ckpt = {"model.diffusion_model." + k: v for k, v in sf.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    ckpt.update({"first_stage_model." + k: v for k, v in sf.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    ckpt.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    path = tmp_path / "tiny-sd1.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    cat = picture(tmp_path / "cat.png", SD_PX, SD_PX)
    common = ["--image", cat, "--prompt", "a cat", *FAST_SD, "--seed", "3"]
    assert run("reconstruct", "--model", folders["sd"], *common, "--out", tmp_path / "folder") == 0
    assert run("reconstruct", "--model", path, "--config", folders["sd"], *common, "--out", tmp_path / "file") == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "cat_reconstruction.png")) for d in ("folder", "file"))
    assert np.array_equal(a, b)
    za, zb = (Inversion.load(tmp_path / d / "inversion.safetensors").result.z_T for d in ("folder", "file"))
    assert torch.allclose(za, zb, rtol=0, atol=1e-6 * za.abs().max().item())


def test_plan_flags_override_only_what_is_given():
    """A plan flag not given keeps the preset's value; 'none' is None for numbers (--tol none turns
    tolerance stopping off) and the word "none" for word fields (--warm-start none)."""
    from renoise.__main__ import _plan_overrides, build_parser
    base = ["edit", "--image", "x.png", "--prompt", "a", "--edit-prompt", "b", "--out", "o"]
    args = build_parser().parse_args([*base,
                                      "--tol", "none", "--warm-start", "none", "--noise-correction", "none",
                                      "--anderson", "3", "--relax", "2", "--window", "3,4", "--weights", "1",
                                      "--tol-plain", "6"])
    assert _plan_overrides(args) == {"tol": None, "warm_start": "none", "noise_correction": "none", "anderson": 3,
                                     "relax": 2, "window": (3, 4), "weights": (1,), "tol_plain": 6}
    assert _plan_overrides(build_parser().parse_args(base)) == {}


def test_compile_flags(tmp_path, capsys):
    """--compile / --cuda-graphs choose the Editor's compile mode; CUDA graphs off CUDA is refused
    with the reason, before any work."""
    from renoise.__main__ import build_parser
    base = ["edit", "--image", "x.png", "--prompt", "a", "--edit-prompt", "b", "--out", "o"]
    assert build_parser().parse_args(base).compile is None
    assert build_parser().parse_args([*base, "--compile"]).compile == "compile"
    assert build_parser().parse_args([*base, "--cuda-graphs"]).compile == "cuda-graphs"
    example = Path(__file__).resolve().parents[1] / "examples" / "scene.png"
    code = main(["reconstruct", "--image", str(example), "--prompt", "a large red circle in the center on a blue "
                 "background", "--out", str(tmp_path / "out"), "--device", "cpu", "--cuda-graphs"])
    assert code != 0 and "CUDA graphs need a CUDA device" in capsys.readouterr().err
