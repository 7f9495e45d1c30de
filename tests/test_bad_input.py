"""Issue 25: bad inputs to the API and to `python -m renoise invert | reconstruct | edit`.

Each bad input either works correctly or exits 2 with one line that names the input and what to
do, writes nothing and leaves nothing behind. A tiny random-weight model in the demo model's
folder layout keeps every CLI run to a fraction of a second."""
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import renoise
from renoise import fixed_point
from renoise import images as imgs
from renoise.__main__ import main
from renoise.inversion import InversionResult, NonFiniteLatentError
from renoise.presets import Plan
from renoise.schedules import Schedule

STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A demo-shaped pipeline folder with tiny random networks (fp32), as in test_eval."""
    from renoise.demo import model as demo_model
    from renoise.models.clip import CLIPTextConfig, CLIPTextModel
    from renoise.models.configs import UNetConfig, VAEConfig
    from renoise.models.unet import UNet
    from renoise.models.vae import AutoencoderKL
    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                           num_heads=(2, 2), transformer_layers_per_block=(1, 1), cross_attention_dim=16,
                           norm_num_groups=4, sample_size=16))
    with torch.no_grad():
        unet.conv_in.weight.mul_(0.01)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                                  sample_size=128, scaling_factor=1.0))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(demo_model.vocabulary()[0]), hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        projection_dim=16))
    return demo_model.write_folder(tmp_path_factory.mktemp("tiny") / "demo", unet, vae, text, dtype=torch.float32)


def picture(path, h=32, w=32, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def cli(*argv):
    return main([str(a) for a in argv] + ["--quiet"])


@pytest.fixture(scope="module")
def inversion(model, tmp_path_factory):
    """A saved inversion (DDIM, 2 steps) of a 32 px picture."""
    out = tmp_path_factory.mktemp("inv") / "out"
    assert cli("invert", "--model", model, "--image", picture(out.parent / "x.png"), *STEPS, "--out", out) == 0
    return out / "inversion.safetensors"


def refused(capsys, code, *words, where=None, before=None):
    """Exit 2, one line on stderr naming the problem, nothing new under `where`."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("renoise "), err
    for w in words:
        assert w in err, err
    if where is not None:
        assert sorted(os.listdir(where)) == before, os.listdir(where)
    return err


# ------------------------------------------------------------------------------------ API: NaN and inf

def test_fixed_point_non_finite_with_and_without_tol_counts_calls_from_one():
    z0 = torch.ones(3, 2)
    calls = []

    def g(z):
        calls.append(1)
        out = 0.5 * z
        return out * float("nan") if len(calls) == 3 else out      # the third call

    for tol in (None, 1e-9):
        calls.clear()
        with pytest.raises(fixed_point.NonFiniteError, match=r"at call 3\b") as e:
            fixed_point.iterate(g, z0, 5, tol=tol)
        assert e.value.call == 3 and e.value.samples == [0, 1, 2] and isinstance(e.value, ValueError)
    res = fixed_point.iterate(lambda z: 0.5 * z, z0, 4)           # finite: no error, same answer as before
    assert torch.equal(res.z, z0 / 16)
    for weights in ([1, float("inf")], [float("nan"), 1]):
        with pytest.raises(ValueError, match="weights must be finite"):
            fixed_point.iterate(lambda z: 0.5 * z, z0, 2, weights=weights)


def _toy():
    schedule = Schedule.create(timestep_spacing="leading", steps_offset=1)
    return schedule, torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def test_invert_with_tol_and_sample_raise_non_finite_latent_error_naming_step_and_timestep():
    schedule, z0 = _toy()
    calls = []

    def nan_on_call_4(x, t):
        calls.append(t)
        return 0.1 * x * (float("nan") if len(calls) == 4 else 1.0)

    for tol in (1e-12, None):
        calls.clear()
        plan = Plan(iters=2, average=False, tol=tol)
        with pytest.raises(NonFiniteLatentError, match=r"inversion step 1 \(timestep t=\d+\), renoising iteration "
                                                       r"i=0.*guidance"):
            renoise.invert(nan_on_call_4, z0, schedule, "ddim", 3, plan)
    res = renoise.invert(lambda x, t: torch.zeros_like(x), z0, schedule, "ddim", 3, Plan())
    steps = []

    def nan_at_second_step(x, t):
        steps.append(t)
        return torch.zeros_like(x) * (float("inf") if len(steps) == 2 else 1.0)

    with pytest.raises(NonFiniteLatentError, match=rf"denoising step 1 \(timestep t={res.chain[1][0]}\)"):
        renoise.sample(nan_at_second_step, res)
    assert torch.isfinite(renoise.sample(lambda x, t: torch.zeros_like(x), res)).all()


def test_decode_of_non_finite_latents_is_refused(model):
    from renoise.models import load_pipeline
    from renoise.pipeline import decode_latents
    pipe = load_pipeline(model)
    z = torch.zeros(1, 4, 4, 4)
    assert decode_latents(pipe, z).shape == (1, 3, 32, 32)
    with pytest.raises(NonFiniteLatentError, match="decoding gave NaN or inf"):
        decode_latents(pipe, z.fill_(float("inf")))


# ------------------------------------------------------------------------------------ images and prompts

def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = imgs.to_tensor(imgs.load_image(tmp_path / "g16.png", mode="none"))
    row = (x[0, 0, 0] + 1) / 2
    assert torch.allclose(row, torch.from_numpy(ramp[0] / 65535).float(), atol=1 / 255)   # the ramp, not white
    assert float((row == 1).float().mean()) < 0.05 and torch.equal(x[0, 0], x[0, 1])


def test_long_prompts_warn_once_with_token_count_and_dropped_text(model):
    from renoise.models import load_pipeline
    from renoise.pipeline import encode_prompts
    pipe = load_pipeline(model)
    words = " ".join(["red"] * 80) + " circle tiger"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_prompts(pipe, [words, words, "red circle"])
        encode_prompts(pipe, [words])
    long = [w for w in caught if "tokens" in str(w.message)]
    assert len(long) == 1, [str(w.message) for w in caught]
    text = str(long[0].message)
    n = len(pipe.tokenizer.encode(words))                      # 80 + "circle" + however "tiger" splits
    assert n > 81 and f"has {n + 2} tokens" in text and "not supported" in text
    dropped = " ".join(["red"] * (n - 75 - (n - 80))) + " circle tiger"       # past token 75 (77 with BOS, EOS)
    assert f"dropped: {dropped!r}" in text


# ------------------------------------------------------------------------------------ inversion files

def test_inversion_load_names_the_file_for_every_damage(inversion, tmp_path):
    good = inversion.read_bytes()
    assert InversionResult.load(inversion).num_steps == 2
    cases = {"folder": None, "empty": b"", "truncated": good[:len(good) // 2], "random": os.urandom(300)}
    for name, data in cases.items():
        path = tmp_path / name
        path.mkdir() if data is None else path.write_bytes(data)
        with pytest.raises(ValueError, match=str(path)):
            InversionResult.load(path)
    res = InversionResult.load(inversion)
    damaged = {
        "steps.safetensors": lambda r: setattr(r, "num_steps", 5),
        "nan.safetensors": lambda r: r.noises.__setitem__(0, torch.full_like(r.z_T, float("nan")))
        if r.noises[0] is not None else r.trajectory[1].fill_(float("nan")),
        "inf.safetensors": lambda r: r.z_T.fill_(float("inf")),
    }
    for name, damage in damaged.items():
        r = InversionResult.load(inversion)
        damage(r)
        r.save(tmp_path / name)
        with pytest.raises(ValueError, match=f"{tmp_path / name}.*(steps|NaN or inf)"):
            InversionResult.load(tmp_path / name)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(inversion))
    from safetensors import safe_open
    with safe_open(str(inversion), "pt") as f:
        meta = dict(f.metadata())
    del meta["num_noises"]
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"{tmp_path / 'meta.safetensors'}.*'num_noises'.*invert again"):
        InversionResult.load(tmp_path / "meta.safetensors")
    assert res.num_steps == 2


# ------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("flag,value", [("--edit-guidance", "inf"), ("--edit-guidance", "1e30"),
                                        ("--edit-guidance", "nan"), ("--edit-guidance", "-1"),
                                        ("--guidance", "nan"), ("--seed", str(2 ** 70)),
                                        ("--prompt", "a \udcff circle"), ("--edit-prompt", "b\udcfe")])
def test_edit_refuses_bad_numbers_and_texts(flag, value, model, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    args = {"--prompt": "a circle", "--edit-prompt": "a square", flag: value}
    argv = ["edit", "--model", model, "--image", picture(tmp_path / "x.png"), *STEPS, "--out", tmp_path / "out"]
    for k, v in args.items():
        argv += [k, v]
    before = sorted(os.listdir(tmp_path))
    refused(capsys, cli(*argv), flag, where=tmp_path, before=before)


def test_huge_guidance_is_a_one_line_error_with_a_hint(model, tmp_path, capsys):
    image = picture(tmp_path / "x.png")
    before = sorted(os.listdir(tmp_path))
    code = cli("edit", "--model", model, "--image", image, *STEPS, "--guidance", "1e30", "--prompt", "a",
               "--edit-prompt", "b", "--out", tmp_path / "out")
    refused(capsys, code, "non-finite", "guidance", where=tmp_path, before=before)


@pytest.mark.parametrize("flag,value", [("--sampler", "euler_ancestral"), ("--preset", "sdxl-turbo"),
                                        ("--strength", "0.5"), ("--guidance", "3"), ("--iters", "4"),
                                        ("--eta", "0.5"), ("--clip-skip", "1"), ("--negative-prompt", "x")])
def test_edit_from_an_inversion_refuses_flags_it_would_drop(flag, value, model, inversion, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    code = cli("edit", "--model", model, "--inversion", inversion, "--edit-prompt", "b", flag, value,
               "--out", tmp_path / "out")
    refused(capsys, code, flag, "saved inversion", where=tmp_path, before=before)


def test_edit_from_an_inversion_takes_flags_that_agree(model, inversion, tmp_path):
    assert cli("edit", "--model", model, "--inversion", inversion, "--edit-prompt", "b", "--sampler", "ddim",
               "--strength", "1", "--steps", "2", "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "report.json").is_file()


def test_damaged_inversions_are_refused_before_anything_is_written(model, inversion, tmp_path, capsys):
    res = InversionResult.load(inversion)
    res.z_T.fill_(float("nan"))
    res.save(tmp_path / "nan.safetensors")
    res = InversionResult.load(inversion)
    res.num_steps = 7
    res.save(tmp_path / "steps.safetensors")
    for name, words in (("nan.safetensors", ["NaN or inf"]), ("steps.safetensors", ["num_steps 7"])):
        before = sorted(os.listdir(tmp_path))
        code = cli("edit", "--model", model, "--inversion", tmp_path / name, "--edit-prompt", "b",
                   "--out", tmp_path / "out")
        refused(capsys, code, name, *words, where=tmp_path, before=before)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_interrupts_exit_quietly_and_leave_nothing(how, model, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) exits 130, SIGTERM 143; the staged .renoise-partial-* folder goes."""
    from renoise import pipeline
    real = pipeline.Editor.invert

    def invert_then_stop(self, *a, **kw):
        out = real(self, *a, **kw)
        assert any(p.name.startswith(".renoise-partial-") for p in tmp_path.iterdir())     # staging exists
        if how == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(pipeline.Editor, "invert", invert_then_stop)
    image = picture(tmp_path / "x.png")
    before = sorted(os.listdir(tmp_path))
    code = main(["edit", "--model", str(model), "--image", image, *STEPS, "--edit-prompt", "b",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == {"SIGINT": 130, "SIGTERM": 143}[how]
    assert err[-1].startswith("renoise edit: " + {"SIGINT": "interrupted", "SIGTERM": "terminated"}[how])
    assert "Traceback" not in "\n".join(err)
    assert sorted(os.listdir(tmp_path)) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_failed_final_move_leaves_the_old_output_whole(model, tmp_path, capsys, monkeypatch):
    image = picture(tmp_path / "x.png")
    out = tmp_path / "out"
    argv = ["reconstruct", "--model", model, "--image", image, *STEPS, "--out", out]
    assert cli(*argv) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real, moves = os.replace, []

    def replace_fails_at_the_fourth(src, dst):
        moves.append(dst)
        if len(moves) == 4:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_at_the_fourth)
    assert cli(*argv, "--seed", "1") == 1
    monkeypatch.setattr(os, "replace", real)
    assert "No space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old               # old report with old images
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".renoise-partial-")]
    assert cli(*argv, "--seed", "1") == 0                                        # then it works, all new
    assert json.loads((out / "report.json").read_text())["seed"] == 1
