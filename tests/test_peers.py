"""renoise.peers: each peer's defining property on the analytic mixture (renoise.toy) and random
denoisers, the pipeline-level peers on the demo model, and every peer through `renoise eval`."""
import json
from pathlib import Path

import pytest
import torch

from renoise import fixed_point, peers, presets, samplers
from renoise.inversion import invert
from renoise.peers import cost, exact, newton, nulltext
from renoise.schedules import Schedule
from renoise.toy import GaussianMixture

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
            prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
DDIM = samplers.get("ddim")


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixture.random(8, 16, std=0.05, scale=1.0, generator=gen)
    return mix, mix.sample(6, gen), Schedule.from_config(SD15), gen


def random_denoiser(dim, seed, dtype=torch.float64):
    """An untrained denoiser: a random tanh layer, nothing like a score."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.5
    return lambda x, t: (torch.tanh(x.double() @ w) * (1 + t / 500)).to(x.dtype)


# ------------------------------------------------------------------------------- exact inversions

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["mixture", "random"])
@pytest.mark.parametrize("num_steps", [4, 25])
def test_edict_and_bdia_reconstruct_to_float_precision_on_any_denoiser(problem, kind, num_steps, prediction):
    mix, x0, _, _ = problem
    s = Schedule.from_config({**SD15, "prediction_type": prediction})
    den = mix.denoiser(s, "ddim") if kind == "mixture" else random_denoiser(x0.shape[1], num_steps)
    for dtype, rel in ((torch.float64, 1e-11), (torch.float32, 1e-4)):
        z0 = x0.to(dtype)
        e = exact.edict_invert(den, z0, s, "ddim", num_steps)
        b = exact.bdia_invert(den, z0, s, "ddim", num_steps)
        assert e.model_calls == 2 * num_steps and b.model_calls == num_steps
        for back in (exact.edict_sample(den, e), exact.bdia_sample(den, b)):
            assert back.dtype == dtype
            err = float((back - z0).abs().max() / z0.abs().max())
            assert err < rel, (dtype, err)
        # ... and z_T is a real inversion, not z0 passed through: it is far from z0
        assert float((e.z_T - z0).abs().mean()) > 0.1


def test_plain_ddim_inversion_is_not_exact_where_edict_is(problem):
    """The contrast that makes the exact property mean something: DDIM's round trip misses."""
    mix, x0, s, _ = problem
    den = mix.denoiser(s, "ddim")
    inv = invert(den, x0, s, "ddim", 10, presets.Plan(num_steps=10))
    z = inv.z_T
    for t, tn in s.chain(10, "ddim"):
        z = DDIM.step(z, den(z, t), t, tn, s)
    assert float((z - x0).abs().max()) > 1e-3


def test_exact_methods_refuse_bad_settings_and_noisy_samplers(problem):
    mix, x0, s, _ = problem
    den = mix.denoiser(s, "ddim")
    with pytest.raises(ValueError, match="mixing p"):
        exact.edict_invert(den, x0, s, "ddim", 4, p=0.0)
    with pytest.raises(ValueError, match="gamma"):
        exact.bdia_invert(den, x0, s, "ddim", 4, gamma=1.5)
    with pytest.raises(ValueError, match="deterministic"):
        exact.edict_invert(den, x0, s, "euler_ancestral", 4)


# ------------------------------------------------------------------------------------- null-text

def test_null_text_optimised_embeddings_lower_each_steps_error(problem):
    """The mixture's unconditional branch has its log-weights as the 'embedding' ∅; the condition
    favours two components. Every step's loss at the optimised ∅_t is below the loss at its start."""
    _, _, s, gen = problem
    mix = GaussianMixture.random(8, 16, std=0.5, scale=0.5, generator=gen)     # overlapping components
    x0 = mix.sample(6, gen)
    logits = torch.zeros(mix.means.shape[0], dtype=torch.float64)
    logits[:2] = 1.0
    cond = GaussianMixture(mix.means, mix.std, logits).denoiser(s, "ddim")

    def uncond(x, t, null):
        return GaussianMixture(mix.means, mix.std, null).denoiser(s, "ddim")(x, t)

    n = 6
    pivots = invert(cond, x0, s, "ddim", n, presets.Plan(num_steps=n)).trajectory
    null0 = torch.zeros(mix.means.shape[0], dtype=torch.float64)
    nulls, log, counts = nulltext.optimize_nulls(cond, uncond, null0, pivots, s, "ddim", n, guidance=7.5,
                                                 inner_steps=10, lr=1e-2, early_stop=1e-12)
    assert len(nulls) == n and counts["backward"] == sum(log["inner"]) == 10 * n
    assert counts["cond"] == n and counts["uncond"] == counts["backward"] + n
    before, after = torch.tensor(log["before"]), torch.tensor(log["after"])
    assert bool((after < before).all()), (before, after)
    assert float((after / before).median()) < 0.9
    assert not torch.equal(nulls[-1], null0)
    # sampling with the per-step ∅_t follows the pivots: closer to z0 than guidance with ∅ = the start
    result = peers._common.PeerResult("null-text", pivots[-1], pivots, s, "ddim", n, torch.zeros(n))

    def guided(null):
        return lambda x, t: uncond(x, t, null) + 7.5 * (cond(x, t) - uncond(x, t, null))

    tuned = nulltext.sample(lambda i: guided(nulls[i]), result)
    plain = nulltext.sample(lambda i: guided(null0), result)
    assert float((tuned - x0).pow(2).mean()) < float((plain - x0).pow(2).mean())


# ------------------------------------------------------------------------------------------ GNRI

@pytest.mark.parametrize("autograd", [False, True])
def test_gnri_objective_falls_at_every_step_off_the_first(problem, autograd):
    """GNRI's Newton scheme lowers its objective F = ‖z - G(z)‖₁ + λ‖z - μ‖₂/β from the start z_{t'}
    to the answer, at the paper's settings (2 calls a step; backward passes only with autograd), on
    every step whose kernel variance β is >= 0.15. On the first step (β ≈ 1e-3, λ/β ≈ 100) F
    rises: z⁰ = z_{t'} sits on μ, and the answer G(z) is pulled off it (F = 0 has no root)."""
    mix, x0, s, _ = problem
    den = mix.denoiser(s, "ddim")
    r = newton.gnri_invert(den, x0, s, "ddim", 10, autograd=autograd, track_objective=True)
    assert r.model_calls == 20 and r.backward == (20 if autograd else 0)
    ratios = []
    for (t, tn), F in zip(reversed(s.chain(10, "ddim")), r.log["objective"]):
        assert F.shape == (3, x0.shape[0])               # [iters + 1, B]: each iterate (z⁰ = z_{t'}), the answer
        beta = float(newton.prior_terms(s, x0, t, tn)[1])
        if tn is None:
            assert bool((F[-1] > F[0]).all()), F
        elif beta >= 0.15:
            assert bool((F[-1] < F[0]).all()), (t, F)
            ratios.append(float((F[-1] / F[0]).median()))
    assert len(ratios) == 8 and sum(ratios) / len(ratios) < 0.6, ratios


def test_gnri_frozen_gradient_is_the_objective_gradient_with_the_model_output_held_fixed(problem):
    """The default (the authors' code) differentiates F with G(z) held fixed: the closed form
    matches autograd on F(z, g) with g a constant."""
    mix, x0, s, gen = problem
    z, g, mu = (torch.randn(x0.shape, generator=gen, dtype=torch.float64) for _ in range(3))
    x = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(newton.objective(x, g, mu, 0.3, 0.1).sum(), x)
    assert torch.allclose(newton._frozen_grad(z, g, mu, 0.1, 0.3), auto, rtol=1e-12, atol=1e-12)


def test_gnri_beats_ddim_inversion_on_the_mixture(problem):
    mix, x0, s, _ = problem
    den = mix.denoiser(s, "ddim")

    def round_trip(z_T):
        z = z_T
        for t, tn in s.chain(10, "ddim"):
            z = DDIM.step(z, den(z, t), t, tn, s)
        return float((z - x0).pow(2).mean())

    ddim = invert(den, x0, s, "ddim", 10, presets.Plan(num_steps=10)).z_T
    gnri = newton.gnri_invert(den, x0, s, "ddim", 10).z_T
    assert round_trip(gnri) < 0.9 * round_trip(ddim)


# ------------------------------------------------------------------------------------------ AIDI

def test_aidi_on_a_linear_map_matches_the_closed_form():
    """With ε(x, t) = W·x every DDIM inversion step is linear: z = (z' - B·W·z)/A, so
    z = (A·I + B·W)⁻¹ z'. AIDI (the 'aidi' peer's plan: Anderson mixing through renoise.invert)
    finds it to 1e-7 (Anderson's regularisation sets the floor); plain iteration with the same calls does not."""
    gen = torch.Generator().manual_seed(1)
    d = 3
    w = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.4
    den = lambda x, t: x @ w.T                                     # noqa: E731
    s = Schedule.from_config(SD15)
    z0 = torch.randn(4, d, generator=gen, dtype=torch.float64)
    spec = peers.resolve("aidi")
    plan = presets.Plan(num_steps=5, **spec["plan"])
    res = invert(den, z0, s, "ddim", 5, plan)
    z = z0
    for t, tn in reversed(s.chain(5, "ddim")):
        A, B, _ = DDIM.coefficients(t, tn, s)
        z = torch.linalg.solve(A * torch.eye(d, dtype=torch.float64) + B * w, z.T).T
    assert float((res.z_T - z).abs().max()) < 1e-7          # Anderson's regularisation (1e-6) sets the floor
    plain = invert(den, z0, s, "ddim", 5, presets.Plan(num_steps=5, iters=spec["plan"]["iters"], average=False))
    assert float((plain.z_T - z).abs().max()) > 100 * float((res.z_T - z).abs().max())


def test_fixed_point_anderson_on_a_linear_map_in_d_plus_one_calls():
    """The operator under AIDI: Anderson with memory m >= d solves a linear contraction in d + 1 calls."""
    gen = torch.Generator().manual_seed(2)
    d = 3
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = 0.5 * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(2, d, generator=gen, dtype=torch.float64)
    star = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - a, b.T).T
    res = fixed_point.iterate(lambda z: z @ a.T + b, torch.zeros_like(b), 12, anderson=d, anderson_reg=0.0)
    assert float((res.z - star).abs().max()) < 1e-10


# ------------------------------------------------------------------------------------------- costs

def test_backward_ratio_is_measured_and_backward_passes_cost():
    lin = torch.nn.Linear(64, 64)
    r = cost.backward_ratio(lambda x: lin(x).tanh(), torch.randn(8, 64))
    assert r >= 0 and r == r
    assert cost.call_equivalents(10, 4, 0.5) == 12.0
    with pytest.raises(ValueError, match="ratio"):
        cost.call_equivalents(10, 4, None)


def test_resolve_names_settings_and_refuses_unknown_fields():
    assert peers.resolve("edict")["p"] == 0.93 and peers.resolve("null-text")["inner_steps"] == 10
    assert peers.resolve("edict", p=0.9, guidance=1.0)["p"] == 0.9
    assert peers.resolve("aidi", iters=2)["plan"]["iters"] == 2
    with pytest.raises(ValueError, match="unknown peer"):
        peers.resolve("edikt")
    with pytest.raises(ValueError, match="unknown field 'gamma'"):
        peers.resolve("edict", gamma=1.0)
    with pytest.raises(ValueError, match="edit_negative"):
        peers.resolve("bdia", edit_negative="other")
    assert set(peers.GROUP) == set(peers.PAPERS)
    # the settings checked against their sources (renoise.peers.PAPERS, RESULTS): GNRI's paper and authors'
    # code (2 iterations, λ = 0.1, no backward pass), AIDI's public reimplementation (K = 5, m = 3, mixing 1)
    assert {k: peers.PEERS["gnri"][k] for k in newton.GNRI} == newton.GNRI == dict(iters=2, lam=0.1, autograd=False,
                                                                                eta=1e-3)
    assert peers.PEERS["aidi"]["plan"] == dict(iters=5, anderson=3, average=False)
    assert presets.Plan().relax == 1.0 and presets.Plan().tol is None and presets.Plan().warm_start == "none"
    assert "dvirsamuel/NewtonRaphsonInversion" in peers.PAPERS["gnri"]
    assert "wmchen/diffusion-inversion" in peers.PAPERS["aidi"]


# ---------------------------------------------------------------------------- eval, demo model

def test_methods_spec_names_each_peer_and_the_group():
    from renoise.evaluation import methods
    group = methods.parse_methods(["peers"])
    assert [m.name for m in group] == ["preset", *peers.GROUP]
    (one,) = methods.parse_spec("edict")
    assert one.peer["kind"] == "edict"
    (custom,) = methods.parse_spec("edict-g1:peer=edict,guidance=1,edit_guidance=none,edit_negative=source")
    assert custom.peer["guidance"] == 1 and custom.peer["edit_guidance"] is None
    plan = custom.plan("demo", {"sampler": "ddim", "num_steps": 10, "guidance_scale": 1.0})
    assert plan.guidance_scale == 1.0 and plan.name == "edict-g1"
    with pytest.raises(ValueError, match="unknown field"):
        methods.parse_spec("x:peer=edict,iters=3")


def test_every_peer_runs_through_eval_on_the_demo_model(tmp_path):
    """`renoise eval --methods peers` on one held-out scene at 2 DDIM steps: a row per method, the
    exact peers reconstruct the latent to float precision, costs are counted as documented."""
    from renoise.__main__ import main
    out = tmp_path / "o"
    assert main(["eval", "--demo", "1", "--steps", "2", "--methods", "peers", "edict-g1:peer=edict,guidance=1",
                 "gnri-autograd:peer=gnri,autograd=true",
                 "--out", str(out), "--threads", "1", "--quiet", "--no-plots"]) == 0
    rows = {r["method"]: r for r in map(json.loads, Path(out, "rows.jsonl").read_text().splitlines())}
    assert set(rows) == {"preset", "edict-g1", "gnri-autograd", *peers.GROUP}
    assert all(r["status"] == "ok" for r in rows.values())
    for name in ("edict", "edict-g1", "bdia"):
        assert rows[name]["latent_psnr"] > 90, name
    assert rows["ddim-inversion"]["latent_psnr"] < 60
    assert rows["edict"]["evals_invert"] == 2 * rows["edict"]["calls_invert"] == 8       # CFG (guidance 3): 2
    assert rows["edict-g1"]["evals_invert"] == rows["edict-g1"]["calls_invert"] == 4
    assert rows["ddim-inversion-cfg"]["evals_invert"] == 2 * rows["ddim-inversion-cfg"]["calls_invert"]
    for name in ("null-text", "gnri-autograd"):
        r = rows[name]
        assert r["backward_invert"] > 0 and r["backward_ratio"] > 0
        assert r["cost_invert"] == pytest.approx(r["evals_invert"] + r["backward_ratio"] * r["backward_invert"])
    assert rows["gnri-autograd"]["backward_invert"] == 4 and rows["gnri-autograd"]["calls_invert"] == 4
    assert rows["gnri"]["backward_invert"] == 0 and rows["gnri"]["calls_invert"] == 4       # the authors' code
    assert rows["null-text"]["calls_invert"] == 2 + 2 + rows["null-text"]["backward_invert"] + 2
    assert all("edit_success" in r for r in rows.values())
    summary = json.loads(Path(out, "summary.json").read_text())
    assert "cost_invert" in summary["methods"]["gnri"]["metrics"]
    run = json.loads(Path(out, "run.json").read_text())
    assert run["peers"]["edict-g1"]["guidance"] == 1


@pytest.fixture(scope="module")
def demo_pair():
    from renoise.demo import Scene, Shape, render_tensor
    from renoise.models import load_pipeline
    pipe = load_pipeline("demo", dtype=torch.float32, device="cpu")
    scene = Scene((Shape("square", "yellow", "large", "center"),), ("black",))
    return pipe, render_tensor(scene), "a large yellow square in the center on a black background", \
        "a large green square in the center on a black background"


@pytest.mark.parametrize("name", [*peers.GROUP, "null-text-src:peer=null-text,edit_negative=source"])
def test_every_peer_edits_in_the_editing_modes_with_its_own_protocol(demo_pair, name):
    """A peer's pair run (renoise.editing.run_pair with the peer's sampling and edit protocol): the
    source branch is the peer's reconstruction, the edit branch without any control its own edit,
    and under a user mask the edit's latents outside it are the source's."""
    from renoise.editing import EditControl
    from renoise.evaluation.methods import parse_spec
    from renoise.peers.editors import make
    pipe, x, source, edit = demo_pair
    (method,) = parse_spec(name)
    editor = make(pipe, method.plan("demo", {"sampler": "ddim", "num_steps": 3}), method.peer)
    inv = editor.invert(x, source, generator=torch.Generator().manual_seed(0), sample_posterior=False)
    recon, _ = editor.reconstruct_latents(inv)
    own, _ = editor.edit_latents(inv, edit, edit_guidance_scale=2.0)
    assert float((own - recon).abs().max()) > 1e-3                      # the edit does change something

    swap, out = editor.edit_latents(inv, edit, edit_guidance_scale=2.0, control=EditControl(save_attention=True))
    scale = float(recon.abs().max())
    assert float((out.source - recon).abs().max()) / scale < 1e-4, name
    assert float((swap - own).abs().max()) / scale < 1e-4, name

    mask = torch.zeros(x.shape[-2:])
    mask[:, : x.shape[-1] // 2] = 1
    masked, out = editor.edit_latents(inv, edit, edit_guidance_scale=2.0, control=EditControl(mask=mask))
    inside = out.mask.bool().expand_as(masked)
    assert torch.equal(masked[~inside], out.source[~inside])
    assert float((masked[inside] - out.source[inside]).abs().max()) > 1e-3
    p2p, _ = editor.edit_latents(inv, edit, edit_guidance_scale=2.0, control=EditControl(mode="p2p"))
    assert torch.isfinite(p2p).all() and float((p2p - swap).abs().max()) > 0   # the maps were replaced
    blended, out = editor.edit_latents(inv, edit, edit_guidance_scale=2.0, control=EditControl(local_blend=("auto",)))
    outside = (out.mask == 0).expand_as(blended)
    assert 0 < int(outside.sum()) < outside.numel() and torch.equal(blended[outside], out.source[outside])


def test_peers_run_the_editing_modes_through_eval(tmp_path):
    """`renoise eval --methods peers --edit-mode p2p --mask-edits --local-blend auto --paste-back` at 2 steps
    (BDIA's first step makes no call, so local blending has no maps yet there): every peer edits in the pair
    run (its rows say the mode and carry a blend mask inside the scene's), and pasting back keeps the input's
    background exactly, as for ReNoise."""
    from renoise.__main__ import main
    out = tmp_path / "o"
    assert main(["eval", "--demo", "1", "--steps", "2", "--methods", "peers", "--edit-mode", "p2p", "--mask-edits",
                 "--local-blend", "auto", "--paste-back", "--out", str(out), "--threads", "1", "--quiet",
                 "--no-plots"]) == 0
    rows = {r["method"]: r for r in map(json.loads, Path(out, "rows.jsonl").read_text().splitlines())}
    assert set(rows) == {"preset", *peers.GROUP}
    for name, r in rows.items():
        assert r["status"] == "ok" and r["edit_mode"] == "p2p", name
        assert 0 < r["blend_fraction"] < 1 and r["edit_background_psnr"] >= 100, name
        assert 10 < r["edit_background_psnr_decoded"] < 100, name


def test_peer_result_saves_its_state(problem, tmp_path):
    from safetensors import safe_open
    mix, x0, s, _ = problem
    r = exact.edict_invert(mix.denoiser(s, "ddim"), x0, s, "ddim", 3)
    r.save(tmp_path / "e.safetensors")
    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:
        assert f.metadata()["peer"] == "edict"
        assert torch.equal(f.get_tensor("state.y_T.0"), r.state["y_T"])
        assert torch.equal(f.get_tensor("z_T"), r.z_T)
