"""SD3 / FLUX.1 pipelines: load_pipeline on folders written by diffusers' save_pretrained, and
generation from the same latents equal to StableDiffusion3Pipeline / FluxPipeline (output_type="latent")."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from renoise.flow import generate_flow  # noqa: E402
from renoise.models import load_pipeline  # noqa: E402
from renoise.models.flow_pipeline import FlowPipeline, encode_flow_prompts  # noqa: E402
from renoise.models.flux import pack_latents, unpack_latents  # noqa: E402

PROMPTS = ["a photo of a cat", "a dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_flow_pipeline import save_flux, save_sd3
    root = tmp_path_factory.mktemp("flowpipes")
    return {"sd3": save_sd3(root / "sd3"), "sd3-no-t5": save_sd3(root / "sd3-no-t5", t5=False),
            "dev": save_flux(root / "dev", kind="dev"), "schnell": save_flux(root / "schnell", kind="schnell")}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", ["sd3", "sd3-no-t5"])
@pytest.mark.parametrize("hw", [(4, 4), (4, 6)])
def test_sd3_equals_diffusers_true_cfg(folders, name, hw):
    pipe = load_pipeline(folders[name])
    assert isinstance(pipe, FlowPipeline) and pipe.kind == "sd3"
    assert (pipe.text_encoder_3 is None) == (name == "sd3-no-t5")
    extra = dict(text_encoder_3=None, tokenizer_3=None) if name == "sd3-no-t5" else {}
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folders[name], **extra)
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(hash(hw) % 1000))
    ours = generate_flow(pipe, PROMPTS, num_steps=3, guidance_scale=4.5, negative_prompts=["red", ""], latents=z)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, negative_prompt=["red", ""], num_inference_steps=3, guidance_scale=4.5,
                   latents=z.clone(), height=hw[0] * 8, width=hw[1] * 8, output_type="latent").images
    assert want.shape == ours.shape
    print(f"\nsd3 {name} {hw}: rel err {rel(ours, want):.2e}")
    assert rel(ours, want) < 1e-5, rel(ours, want)
    assert rel(ours, z) > 1e-2                       # the chain moved the latents


def test_sd3_text_encoding_equals_encode_prompt(folders):
    pipe = load_pipeline(folders["sd3"])
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    context, pooled = encode_flow_prompts(pipe, PROMPTS)
    with torch.no_grad():
        want_c, _, want_p, _ = ref.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    assert context.shape == (2, 77 + 256, 48) and pooled.shape == (2, 32)
    assert rel(context, want_c) < 1e-6 and rel(pooled, want_p) < 1e-6


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("hw", [(4, 4), (4, 6)])
def test_flux_equals_diffusers(folders, kind, hw):
    pipe = load_pipeline(folders[kind])
    assert pipe.kind == "flux" and pipe.guidance_embeds == (kind == "dev")
    ref = diffusers.FluxPipeline.from_pretrained(folders[kind])
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(7))
    ours = generate_flow(pipe, PROMPTS, num_steps=3, guidance_scale=3.5, latents=z)
    assert pipe.sequence_length == (512 if kind == "dev" else 256)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, num_inference_steps=3, guidance_scale=3.5, latents=pack_latents(z),
                   max_sequence_length=pipe.sequence_length,
                   height=hw[0] * 8, width=hw[1] * 8, output_type="latent").images
    want = unpack_latents(want, *hw)
    print(f"\nflux {kind} {hw}: rel err {rel(ours, want):.2e}")
    assert rel(ours, want) < 1e-5, rel(ours, want)
    assert rel(ours, z) > 1e-2


def test_flux_guidance_matters_for_dev_only(folders):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    dev = load_pipeline(folders["dev"])
    a, b = (generate_flow(dev, "a cat", num_steps=2, guidance_scale=g, latents=z) for g in (1.5, 5.0))
    assert rel(a, b) > 1e-4
    with pytest.raises(ValueError, match="negative prompt"):
        generate_flow(dev, "a cat", num_steps=2, negative_prompts="dog", latents=z)


def test_family_dispatch_errors(folders, tmp_path):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folders["sd3"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "SomethingPipeline"
    index["transformer"] = ["diffusers", "HunyuanDiT2DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="HunyuanDiT2DModel"):
        load_pipeline(bad)


@pytest.mark.parametrize("name", ["sd3-no-t5", "dev"])
def test_hub_id_fetches_only_the_fp16_files_it_reads(folders, tmp_path, monkeypatch, name):
    import shutil

    from tiny_models import FakeHub
    repo = tmp_path / "repo"
    shutil.copytree(folders[name], repo)
    cls = diffusers.FluxPipeline if name == "dev" else diffusers.StableDiffusion3Pipeline
    extra = dict(text_encoder_3=None, tokenizer_3=None) if name == "sd3-no-t5" else {}
    half = cls.from_pretrained(folders[name], torch_dtype=torch.float16, **extra)
    half.save_pretrained(str(repo), variant="fp16", safe_serialization=True)
    for sub in ("transformer", "vae", "text_encoder"):
        (repo / sub / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    hub = FakeHub({"org/flow": repo}, tmp_path / "cache").install(monkeypatch)
    pipe = load_pipeline("org/flow", dtype=torch.float16, variant="fp16")
    assert pipe.transformer.dtype == torch.float16 and pipe.kind == ("flux" if name == "dev" else "sd3")
    weights = [f for f in hub.fetched if not f.endswith((".json", ".txt"))]
    assert weights and all(".fp16." in f and f.endswith(".safetensors") for f in weights), hub.fetched
    assert not any(f.endswith(".bin") for f in hub.fetched)
    assert not any(f.startswith("text_encoder_3") for f in hub.fetched)


def _picture(path, h, w, seed=0):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("name", ["sd3", "dev", "schnell"])
def test_cli_invert_reconstruct_edit(folders, tmp_path, monkeypatch, name):
    import json

    from renoise.__main__ import main
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cat = _picture(tmp_path / "cat.png", 32, 48)
    out, rec, ed = tmp_path / "inv", tmp_path / "rec", tmp_path / "edit"
    common = ["--model", str(folders[name]), "--quiet", "--steps", "3"]
    assert main(["invert", "--image", cat, "--prompt", "a photo of a cat", "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == ("sd3" if name == "sd3" else "flux")
    assert report["preset"] == {"sd3": "sd3-medium", "dev": "flux-dev", "schnell": "flux-schnell"}[name]
    assert report["settings"]["sampler"] == "flow_euler" and report["settings"]["num_steps"] == 3
    assert main(["reconstruct", "--inversion", str(out / "inversion.safetensors"), "--out", str(rec),
                 "--model", str(folders[name]), "--quiet"]) == 0
    assert (rec / "cat_reconstruction.png").is_file()
    r = json.loads((rec / "report.json").read_text())
    assert min(r["metrics"]["latent"]["psnr"]) > 20, r["metrics"]    # ReNoise inverts the tiny flow model closely
    assert main(["edit", "--image", cat, "--prompt", "a photo of a cat", "--edit-prompt", "a dog",
                 "--edit-guidance", "2.0", "--out", str(ed), *common]) == 0
    assert sorted(p.name for p in ed.iterdir()) == ["cat_edit.png", "cat_reconstruction.png",
                                                     "inversion.safetensors", "report.json"]


def test_cli_refuses_what_does_not_apply_to_flow_models(folders, tmp_path, capsys):
    from renoise.__main__ import main
    cat = _picture(tmp_path / "cat.png", 32, 32)
    base = ["invert", "--model", str(folders["dev"]), "--image", cat, "--prompt", "a cat", "--quiet", "--steps", "2"]
    assert main(base + ["--noise-correction", "optimize", "--out", str(tmp_path / "a")]) == 2
    assert "flow Euler step adds none" in capsys.readouterr().err
    assert main(base + ["--reg-rounds", "2", "--lambda-ac", "1", "--out", str(tmp_path / "b")]) == 2
    assert "predict velocity" in capsys.readouterr().err
    assert main(base + ["--sampler", "ddim", "--out", str(tmp_path / "c")]) == 2
    assert "flow_euler" in capsys.readouterr().err


def _readme_block(title, lang):
    from pathlib import Path
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split(title, 1)[1]
    return section.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_readme_flow_snippet_runs(folders):
    """The README's flow-pipeline snippet on the tiny FLUX-dev folder (hub id, dtype, device, size, steps swapped)."""
    code = _readme_block("### Flow models (SD3 / FLUX.1): whole pipelines", "python")
    swaps = {'"black-forest-labs/FLUX.1-dev"': repr(str(folders["dev"])), "torch.bfloat16": "torch.float32",
             '"cuda"': '"cpu"', "(1024, 1024)": "(32, 32)", "num_steps=28": "num_steps=3"}
    for a, b in swaps.items():
        assert a in code, a
        code = code.replace(a, b)
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    env = {"torch": torch, "images": images}
    exec(code, env)
    assert env["z0"].shape == (1, 4, 4, 4) and env["edited"].shape == (1, 3, 32, 48)
    assert env["inv"].result.sampler == "flow_euler" and env["editor"].plan.name == "flow"


def test_readme_flow_cli_line(folders, tmp_path, monkeypatch):
    """The README's CLI line (model folder and image swapped in, 3 steps)."""
    import shlex

    from renoise.__main__ import main
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from pathlib import Path
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split("### Flow models (SD3 / FLUX.1): whole pipelines", 1)[1]
    line = "python -m renoise" + section.split("```\npython -m renoise", 1)[1].split("```", 1)[0]
    line = line.replace("\\\n", " ")
    argv = shlex.split(line)[3:]
    argv[argv.index("--model") + 1] = str(folders["sd3"])
    argv[argv.index("--image") + 1] = _picture(tmp_path / "cat.png", 32, 32)
    argv[argv.index("--steps") + 1] = "3"
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert main(argv + ["--quiet"]) == 0
    assert (tmp_path / "out" / "cat_edit.png").is_file()


def test_renoise_generate_dispatches_flow_pipelines(folders):
    from renoise.generate import generate
    from renoise.pipeline import decode_latents
    pipe = load_pipeline(folders["sd3"])
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    images, x = generate(pipe, "a cat", num_steps=2, guidance_scale=3.0, latents=z, return_latents=True)
    want = generate_flow(pipe, "a cat", num_steps=2, guidance_scale=3.0, latents=z)
    assert torch.equal(x, want) and torch.equal(images, decode_latents(pipe, want))
    assert images.shape == (1, 3, 32, 32)


def test_lora_merges_into_a_flow_pipelines_transformer(folders):
    from renoise.models import merge_lora
    pipe = load_pipeline(folders["dev"])
    w = pipe.transformer.x_embedder.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
    merge_lora(pipe, {"transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": up}, 0.5)
    assert torch.allclose(pipe.transformer.x_embedder.weight, w + 0.5 * up @ down, atol=1e-5)
