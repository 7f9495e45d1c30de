"""Flow presets (issue 23): the per-model presets and how `presets.for_model` picks them (tiny SD3 / FLUX.1
pipelines saved by diffusers), the solver machinery (plain, warm start, Anderson, relax, tol) on flow models
through Editor.invert / reconstruct and on an exact velocity field, and what flow models refuse (noise
correction, the edit-enhancement regularizer, other samplers, editing modes), through the API and the CLI."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

import renoise
from renoise import presets
from renoise.presets import Plan
from renoise.schedules import FlowSchedule

from test_flow_inversion import FLUX, gaussian_velocity  # noqa: E402  (the exact velocity of Gaussian data)

FLOW_PRESETS = ("flux-schnell", "flux-dev", "sd35-large-turbo", "sd3-medium")
SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": False}


# ------------------------------------------------------------------------------------- the presets

@pytest.mark.parametrize("name, steps, guidance", [("flux-schnell", 4, 0.0), ("flux-dev", 28, 1.0),
                                                   ("sd35-large-turbo", 4, 0.0), ("sd3-medium", 28, 1.0)])
def test_flow_presets_settings(name, steps, guidance):
    p = Plan.preset(name)
    assert (p.name, p.sampler, p.num_steps, p.guidance_scale) == (name, "flow_euler", steps, guidance)
    assert not p.regularize and p.noise_correction == "none"
    assert name in presets.names() and Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_first_step_regime_on_the_models_own_schedules():
    """The paper's t < 250 rule mapped onto each model's chain: the 4-step presets give their lowest step
    (schnell t = 250, large-turbo t ≈ 9) SDXL-Turbo's first-step averaging w1..w4 = 0.25 and the others
    w8..w10 = 1/3; the 28-step presets average w1, w2 = 0.5 below t = 250 and take w2 = 1 above."""
    quarter, third = [0.25] * 4, [0.0] * 7 + [1 / 3] * 3
    schnell = FlowSchedule.from_config(SCHNELL, spacing="flux").timesteps(4).tolist()
    assert schnell == [1000.0, 750.0, 500.0, 250.0]
    turbo = FlowSchedule(shift=3.0).timesteps(4).tolist()              # SD 3.5's shift 3 (Stability's CONFIGS)
    for name, ts in (("flux-schnell", schnell), ("sd35-large-turbo", turbo)):
        plan = Plan.preset(name)
        ks, ws = zip(*[(k, [x / sum(w) for x in w]) for k, _, w in map(plan.at, ts)])   # uniform weights
        assert ks == (9, 9, 9, 3), (name, ts)
        assert [pytest.approx(w) for w in ws] == [third, third, third, quarter]
    dev = FlowSchedule.from_config(FLUX, spacing="flux").for_image(4096).timesteps(28).tolist()  # 1024²
    sd3 = FlowSchedule(shift=3.0).timesteps(28).tolist()
    for name, ts, low in (("flux-dev", dev, 2), ("sd3-medium", sd3, 3)):
        regimes = [[x / sum(w) for x in w] for _, _, w in map(Plan.preset(name).at, ts)]
        assert regimes == [[0.0, 1.0]] * (28 - low) + [[0.5, 0.5]] * low, (name, ts[-4:])


def test_flow_plans_refuse_noise_correction_and_the_regularizer():
    with pytest.raises(ValueError, match="flow Euler step adds none"):
        Plan.preset("flux-dev").replace(noise_correction="override")
    with pytest.raises(ValueError, match="predict velocity"):
        Plan.preset("sd3-medium").replace(reg_rounds=4, lambda_kl=0.05)
    with pytest.raises(ValueError, match="flow Euler step adds none"):      # a UNet preset moved onto the flow step
        presets.resolve("sdxl-turbo", sampler="flow_euler")
    with pytest.raises(ValueError, match="predict velocity"):
        presets.resolve("sd15", sampler="flow_euler")
    assert presets.resolve("demo", sampler="flow_euler").tol == 1e-2        # nothing in it that a flow cannot run
    # a turned-off regularizer (weights set, no rounds) is no regularizer
    assert not Plan.preset("flux-dev").replace(lambda_ac=10.0).regularize


def test_invert_refuses_them_on_a_flow_schedule_whatever_the_plans_sampler(problem):
    """renoise.invert takes the sampler apart from the plan: a UNet plan on a flow schedule is refused too."""
    den, z0, sch = problem
    with pytest.raises(ValueError, match="adds none"):
        renoise.invert(den, z0, sch, "flow_euler", 4, Plan(noise_correction="optimize"))
    with pytest.raises(ValueError, match="predicted noise"):
        renoise.invert(den, z0, sch, "flow_euler", 4, "sd15", generator=torch.Generator())


# ------------------------------------------------------------- the machinery on an exact velocity field

@pytest.fixture
def problem():
    """Data x0 ~ N(mean, std²) per element (std in [0.4, 1]), its exact flow-matching velocity, a FLUX schedule:
    each inversion step's map z -> x_a + h·v(z, σ_b) is affine and contracting, its fixed point known."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    std = 0.4 + 0.6 * torch.rand(1, 4, 4, 4, generator=g, dtype=torch.float64)
    z0 = mean + std * torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    return gaussian_velocity(mean, std), z0, FlowSchedule.from_config(FLUX, spacing="flux").for_image(16)


def _solve(problem, k, **plan):
    den, z0, sch = problem
    res = renoise.invert(den, z0, sch, "flow_euler", 4, Plan(sampler="flow_euler", num_steps=4, iters=k,
                                                             window=(k, k + 1), average=False, **plan))
    return res, float((renoise.sample(den, res) - z0).norm() / z0.norm())


def test_machinery_converges_on_an_exact_velocity_field(problem):
    _, euler = _solve(problem, 0)
    plain = {k: _solve(problem, k)[1] for k in (2, 4, 9)}
    assert euler > 0.05 and euler > plain[2] > plain[4] > plain[9] and plain[9] < 1e-4, (euler, plain)
    for k in (0, 2, 4):        # the previous step's velocity is a better start than z_{t'}
        assert _solve(problem, k, warm_start="previous")[1] < 0.8 * (plain.get(k) or euler), k
    anderson = _solve(problem, 9, anderson=3)[1]
    relaxed = _solve(problem, 9, anderson=3, relax=2.0)[1]
    assert anderson < plain[9] / 10 and relaxed < plain[9] / 10, (anderson, relaxed, plain[9])
    res, err = _solve(problem, 9, anderson=3, tol=1e-6)
    assert res.model_calls < 36 and err < 1e-5 and res.convergence()["not_converged"] == [], (res.model_calls, err)
    # plain iteration at the same tol and budget uses more calls and says which solves stopped above tol
    slow, _ = _solve(problem, 9, tol=1e-6)
    stalled = slow.convergence()["not_converged"]
    assert slow.model_calls > res.model_calls and stalled and all(s["residual"] > 1e-6 for s in stalled)


# --------------------------------------------------------------------- tiny SD3 / FLUX.1 pipelines

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("sentencepiece")
    from tiny_flow_pipeline import save_flux, save_sd3
    root = tmp_path_factory.mktemp("flowpresets")
    out = {"sd3": save_sd3(root / "sd3", t5=False), "dev": save_flux(root / "dev", kind="dev"),
           "schnell": save_flux(root / "schnell", kind="schnell")}
    out["turbo"] = root / "tiny-sd3.5-large-turbo"            # the SD3 folder under a turbo model's name
    os.symlink(out["sd3"], out["turbo"])
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    from renoise.models import load_pipeline
    return {name: load_pipeline(str(folders[name])) for name in ("sd3", "dev", "schnell")}


def test_for_model_picks_the_flow_presets(pipes, folders):
    assert presets.for_model(pipes["sd3"], str(folders["sd3"])) == "sd3-medium"
    assert presets.for_model(pipes["sd3"]) == "sd3-medium"
    assert presets.for_model(pipes["sd3"], str(folders["turbo"])) == "sd35-large-turbo"
    assert presets.for_model(pipes["sd3"], "stabilityai/stable-diffusion-3.5-large-turbo") == "sd35-large-turbo"
    assert presets.for_model(pipes["dev"], "black-forest-labs/FLUX.1-dev") == "flux-dev"
    assert presets.for_model(pipes["schnell"], "black-forest-labs/FLUX.1-dev") == "flux-schnell"   # by the model
    assert pipes["dev"].guidance_embeds and not pipes["schnell"].guidance_embeds


def _image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


SETTINGS = {                        # K; the plan fields beside it (average=False: the answer is the last iterate)
    "plain": (0, {}),
    "K9": (9, {}),
    "warm": (3, {"warm_start": "previous"}),
    "cold": (3, {}),
    "anderson": (5, {"anderson": 3}),
    "relax": (5, {"anderson": 3, "relax": 2.0}),
    "tol": (9, {"anderson": 3, "tol": 1e-3}),
}


@pytest.mark.parametrize("kind", ["sd3", "dev"])
def test_machinery_through_the_editor(pipes, kind):
    """Each setting inverts and reconstructs through Editor on the tiny model; on these (contracting) tiny
    models every one reconstructs the latent better than plain Euler inversion, K = 9 ten times better."""
    from renoise.pipeline import Editor
    pipe, image, errors, results = pipes[kind], _image(), {}, {}
    for label, (k, fields) in SETTINGS.items():
        over = dict(iters=k, window=(k, k + 1), first_iters=k, first_window=(k, k + 1), average=False, **fields)
        editor = Editor(pipe, presets.for_model(pipe), num_steps=4, plan_overrides=over)
        assert editor.plan.sampler == "flow_euler" and editor.plan.anderson == fields.get("anderson", 0)
        inv = editor.invert(image, "a photo of a cat", generator=torch.Generator().manual_seed(0),
                            sample_posterior=False)
        z, _ = editor.reconstruct_latents(inv)
        z0 = inv.result.trajectory[0]
        assert torch.isfinite(z).all() and torch.isfinite(inv.result.z_T).all()
        errors[label], results[label] = float((z - z0).norm() / z0.norm()), inv.result
    assert results["plain"].model_calls == 4 and results["K9"].model_calls == 40
    for label in SETTINGS:
        if label != "plain":
            assert errors[label] < 0.5 * errors["plain"], (label, errors)
    assert errors["K9"] < 0.1 * errors["plain"], errors
    assert not torch.equal(results["warm"].z_T, results["cold"].z_T)          # the warm start is used
    assert results["tol"].model_calls < 40 and errors["tol"] < 0.1 * errors["plain"], errors


def test_the_presets_run_on_their_tiny_models(pipes):
    """Each model's default preset through Editor (2 steps): sampler, guidance, the calls its plan makes."""
    from renoise.pipeline import Editor
    for kind, name, calls in (("sd3", "sd3-medium", 2 + 2), ("dev", "flux-dev", 2 + 2), ("schnell", "flux-schnell", 20)):
        editor = Editor(pipes[kind], presets.for_model(pipes[kind]), num_steps=2)
        assert editor.plan.name == name
        inv = editor.invert(_image(), "a photo of a cat", generator=torch.Generator().manual_seed(0))
        assert inv.result.model_calls == calls and inv.guidance_scale == Plan.preset(name).guidance_scale
        assert torch.isfinite(editor.reconstruct_latents(inv)[0]).all()


# ----------------------------------------------------------------------------------------- the CLI

def _picture(path):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_default_preset_follows_the_model(folders, tmp_path):
    from renoise.__main__ import main
    cat = _picture(tmp_path / "cat.png")
    for name, preset in (("turbo", "sd35-large-turbo"), ("schnell", "flux-schnell")):
        out = tmp_path / name
        assert main(["invert", "--model", str(folders[name]), "--image", cat, "--prompt", "a cat", "--quiet",
                     "--steps", "2", "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["preset"] == preset and report["settings"]["plan"]["iters"] == 9
        assert report["settings"]["guidance_scale"] == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--noise-correction", "override"], "flow Euler step adds none"),
    (["--noise-correction", "optimize"], "flow Euler step adds none"),
    (["--preset", "sdxl-turbo"], "flow Euler step adds none"),
    (["--reg-rounds", "2", "--lambda-kl", "0.05"], "predict velocity"),
    (["--preset", "sd15"], "predict velocity"),
    (["--sampler", "euler_ancestral"], "'flow_euler' sampler"),
    (["--eta", "0.5"], "does not take the options ['eta']"),
])
def test_cli_refuses_what_does_not_apply_to_flow_models(folders, tmp_path, capsys, flags, message):
    from renoise.__main__ import main
    cat = _picture(tmp_path / "cat.png")
    for name in ("sd3", "dev"):
        argv = ["invert", "--model", str(folders[name]), "--image", cat, "--prompt", "a cat", "--quiet",
                "--steps", "1", "--out", str(tmp_path / name), *flags]
        assert main(argv) == 2, name
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / name).exists()


def test_cli_refuses_editing_modes_on_flow_models(folders, tmp_path, capsys):
    from renoise.__main__ import main
    cat = _picture(tmp_path / "cat.png")
    argv = ["edit", "--model", str(folders["dev"]), "--image", cat, "--prompt", "a cat", "--edit-prompt", "a dog",
            "--mode", "p2p", "--quiet", "--steps", "1", "--out", str(tmp_path / "p2p")]
    assert main(argv) == 2
    assert "flow models (SD3 / FLUX.1) take plain edits only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- README, --help

README = Path(__file__).resolve().parents[1] / "README.md"


def _help_text(capsys, monkeypatch):
    """`invert --help` with whitespace collapsed (argparse wraps long help at hyphens otherwise)."""
    from renoise.__main__ import main
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_readme_rows_and_help_list_the_flow_presets(capsys, monkeypatch):
    text = README.read_text()
    for name in ("flow",) + FLOW_PRESETS:
        p = Plan.preset(name)
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        k = f"{p.iters}" + ("" if p.first_iters in (None, p.iters) else f" ({p.first_iters} first)")
        a, b = p.first_window
        c, d = p.window
        assert cells[1:5] == ["flow Euler", str(p.num_steps), k,
                              f"t < {p.first_until:g}: [{a}, {b}); else [{c}, {d})"], row
    help_text = _help_text(capsys, monkeypatch)
    assert all(name in help_text for name in FLOW_PRESETS), help_text


def test_readme_table_and_help_name_every_preset(capsys, monkeypatch):
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    help_text = _help_text(capsys, monkeypatch)
    for name in presets.PRESETS:
        assert any(f"`{name}`" in row.split("|")[1] for row in rows), f"README's preset table has no row for {name}"
        assert re.search(rf"[ (]{re.escape(name)}[,;)]", help_text), f"--help does not name the preset {name}"
