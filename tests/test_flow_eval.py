"""`renoise eval` on flow-matching models: tiny random FLUX.1-schnell and SD3 folders saved by diffusers
(tests/tiny_flow_pipeline.py), loaded by our code. The flow-anchors group end to end on demo scenes
(rows per method, calls per anchor, edit metrics, the model's default preset, resume), explicit anchor
specs at equal calls on an image folder, and the refusals before --out is touched."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renoise.__main__ import main
from renoise.evaluation import flows, methods

STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_flow_pipeline import save_flux, save_sd3
    root = tmp_path_factory.mktemp("flows")
    return {"schnell": save_flux(root / "schnell", kind="schnell"), "sd3": save_sd3(root / "sd3", t5=False)}


def evaluate(*argv):
    return main(["eval", *map(str, argv), "--threads", "1", "--quiet", "--no-plots", "--device", "cpu"])


def rows_of(out):
    return {(r["image"], r["method"]): r for r in map(json.loads, Path(out, "rows.jsonl").read_text().splitlines())}


def test_flow_anchors_group_lists_the_comparison():
    names = [m.name for m in methods.parse_methods(["flow-anchors"])]
    assert names[:2] == ["euler-inversion", "plain"]
    assert [f"K{k}" for k in range(1, 10)] == [n for n in names if n[:1] == "K"]
    for anchor in ("rf-solver", "fireflow", "rf-inversion", "rf-inversion-eta0"):
        assert anchor in names
    best = {m.name: m for m in methods.parse_methods(["flow-anchors"])}["warm-anderson-relax2-tol-1e-2"]
    plan = best.plan("flux-schnell", {"sampler": "flow_euler", "num_steps": 4, "guidance_scale": 0.0})
    assert (plan.warm_start, plan.anderson, plan.relax, plan.tol, plan.iters) == ("previous", 3, 2.0, 1e-2, 9)
    both = methods.parse_methods(["flow-anchors", "per-call", "paper-grid"])    # shared names: the same methods
    assert len({m.name for m in both}) == len(both)
    rf0 = {m.name: m for m in both}["rf-inversion-eta0"].plan("flux-schnell", {"num_steps": 4})
    assert (rf0.solver, rf0.rf_gamma, rf0.rf_eta, rf0.num_steps) == ("rf-inversion", 0.5, 0.0, 4)


def test_flow_anchors_on_demo_scenes_end_to_end_and_resume(folders, tmp_path, capsys):
    """Every method of the group runs on a tiny FLUX.1-schnell: the run's preset comes from the model
    (flux-schnell), the steps from --steps, each anchor's calls are its published count, and the
    demo scene's edit is measured. A rerun skips every pair."""
    out = tmp_path / "o"
    argv = ["--model", folders["schnell"], "--demo", 1, "--steps", STEPS, "--methods", "flow-anchors", "--out", out]
    assert evaluate(*argv) == 0
    rows = rows_of(out)
    names = [m.name for m in methods.parse_methods(["flow-anchors"])]
    assert sorted(m for _, m in rows) == sorted(names) and len(rows) == len(names)
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    r = {m: row for (_, m), row in rows.items()}
    n = STEPS
    calls = {"euler-inversion": n, "plain": n, "rf-inversion": n, "rf-inversion-eta0": n, "fireflow": n + 1,
             "rf-solver": 2 * n, **{f"K{k}": n * (k + 1) for k in range(1, 10)}}
    assert {m: r[m]["calls_invert"] for m in calls} == calls
    assert (r["fireflow"]["calls_reconstruct"], r["rf-solver"]["calls_reconstruct"]) == (n + 1, 2 * n)
    assert r["warm-anderson-relax2-tol-1e-2"]["calls_invert"] <= n * 10
    for row in r.values():
        for key in ("latent_psnr", "psnr", "seconds_invert", "calls_edit", "edit_background_psnr"):
            assert row[key] is not None, (row["method"], key)
        assert isinstance(row["edit_success"], bool)
    assert "budget_used" in r["K3"] and "not_converged" in r["warm-anderson-relax2-tol-1e-2"]
    assert all("budget_used" not in r[a] for a in ("euler-inversion", "rf-solver", "fireflow", "rf-inversion"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "flux-schnell"
    plans = summary["plans"]
    assert {plans[m]["num_steps"] for m in names} == {n} and plans["preset"]["iters"] == 9
    assert {plans[m]["sampler"] for m in names} == {"flow_euler"}
    before = (out / "rows.jsonl").read_text()
    assert evaluate(*argv) == 0                                   # resume: nothing left to run
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert (last["pairs_run"], last["pairs_skipped"]) == (0, len(names))
    assert (out / "rows.jsonl").read_text() == before


def picture(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_sd3_folder_anchors_at_equal_calls(folders, tmp_path):
    """SD3 defaults to sd3-medium; anchors named by spec with their own steps compare at equal calls
    (RF-Solver at 2 steps = 4 calls = plain Euler inversion at 4 steps = FireFlow at 3 steps)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        picture(images / f"p{i}.png", 32, 32, seed=i)
    picture(images / "odd.png", 40, 32)                  # a multiple of 8, not of 16: a bad input on a flow
    out = tmp_path / "o"
    specs = ["rfs:preset=rf-solver,num_steps=2", "euler4:preset=euler-inversion,num_steps=4",
             "ff3:preset=fireflow,num_steps=3", "K1"]
    assert evaluate("--model", folders["sd3"], "--images", images, "--prompt", "a photo", "--edit-prompt", "a cat",
                    "--steps", 2, "--methods", *specs, "--out", out) == 0
    rows = rows_of(out)
    odd = {k: rows.pop(k) for k in list(rows) if k[0] == "odd"}
    assert len(odd) == 4 and all(r["status"] == "bad_input" and "multiple of 16" in r["error"] for r in odd.values())
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    assert {r["method"]: r["calls_invert"] for r in rows.values()} == {"rfs": 4, "euler4": 4, "ff3": 4, "K1": 4}
    assert all("edit_background_psnr" not in r and r["calls_edit"] > 0 for r in rows.values())   # no masks here
    assert json.loads((out / "summary.json").read_text())["preset"] == "sd3-medium"


@pytest.mark.parametrize("extra, message", [
    (["--methods", "edict"], "peers"),
    (["--methods", "K1", "--edit-mode", "p2p"], "editing modes"),
    (["--methods", "K1", "--mask-edits"], "editing modes"),
    (["--methods", "K1", "--noise-correction", "optimize"], "noise-correction"),
    (["--methods", "reg:preset=sd15"], "regularizer"),
    (["--methods", "K1", "--sampler", "ddim"], "flow_euler"),
])
def test_what_cannot_run_on_a_flow_is_refused_before_out_is_touched(folders, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert evaluate("--model", folders["schnell"], "--demo", 1, *extra, "--out", out) == 2
    err = capsys.readouterr().err
    assert "is a flow-matching model (flux)" in err and message in err and not out.exists()


def test_anchors_on_a_unet_model_are_refused_before_out_is_touched(tmp_path, capsys):
    out = tmp_path / "never"
    assert evaluate("--model", "demo", "--demo", 1, "--methods", "K1", "fireflow", "--out", out) == 2
    err = capsys.readouterr().err
    assert "UNet model" in err and "fireflow" in err and not out.exists()
    for extra in (["--sampler", "flow_euler"], ["--preset", "flux-schnell"]):
        assert evaluate("--model", "demo", "--demo", 1, "--methods", "K1", *extra, "--out", out) == 2
        err = capsys.readouterr().err
        assert "UNet model" in err and extra[1] in err and not out.exists()


def test_probe_reads_folders_and_single_file_headers(folders, tmp_path):
    from safetensors.torch import save_file
    assert flows.probe(str(folders["schnell"])) == flows.FlowModel("flux", False)
    assert flows.probe(str(folders["sd3"])) == flows.FlowModel("sd3", False)
    assert flows.probe("demo") == flows.UNET
    assert flows.probe(str(tmp_path / "missing")) is None

    def one():
        return torch.zeros(1)

    dev = tmp_path / "dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": one(), "guidance_in.in_layer.weight": one()}, str(dev))
    assert flows.probe(str(dev)) == flows.FlowModel("flux", True)
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": one()}, str(sd3))
    assert flows.probe(str(sd3)) == flows.FlowModel("sd3", False)
    other = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": one()}, str(other))
    assert flows.probe(str(other)) == flows.UNET


def test_single_file_with_config_runs_and_config_is_checked(tmp_path, capsys):
    """An SD3 all-in-one single file (Stability's layout, no T5) with --config the folder it came from;
    --config on a folder is refused before --out is touched."""
    from test_flow_single_file import save_sd3_for_single_files, write_single_file
    folder = tmp_path / "sd3"
    path = write_single_file(tmp_path / "sd3_turbo_incl_clips.safetensors", save_sd3_for_single_files(folder), t5=False)
    images = tmp_path / "images"
    images.mkdir()
    picture(images / "p.png", 32, 32)
    out = tmp_path / "o"
    assert evaluate("--model", path, "--config", folder, "--images", images, "--prompt", "a photo", "--steps", 2,
                    "--methods", "fireflow", "K1", "--out", out) == 0
    rows = rows_of(out)
    assert {r["method"]: (r["status"], r["calls_invert"]) for r in rows.values()} == {"fireflow": ("ok", 3),
                                                                                      "K1": ("ok", 4)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "sd35-large-turbo"           # the file's name says turbo (presets.for_model)
    never = tmp_path / "never"
    assert evaluate("--model", folder, "--config", folder, "--images", images, "--prompt", "a", "--out", never) == 2
    assert "--config applies to single-file checkpoints" in capsys.readouterr().err and not never.exists()


def test_two_processes_share_a_flow_run_with_the_numbers_of_one(folders, tmp_path):
    """Sharding is the same on flows: torchrun with 2 CPU processes (gloo) gives each pair once, from both
    ranks, with the numbers of a 1-process run."""
    import os
    import subprocess
    import sys
    args = ["--model", folders["schnell"], "--demo", 2, "--steps", 2, "--methods", "fireflow", "K1"]
    assert evaluate(*args, "--out", tmp_path / "one") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("EVAL_KILL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("eval_worker.py")), "eval", *map(str, args), "--out", str(tmp_path / "two"),
           "--device", "cpu", "--threads", "1", "--quiet", "--no-plots"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    keys = ("latent_psnr", "psnr", "calls_invert", "calls_reconstruct", "edit_background_psnr", "edit_success")
    assert {k: [r[n] for n in keys] for k, r in two.items()} == {k: [r[n] for n in keys] for k, r in one.items()}
    assert len(two) == 4 and {r["rank"] for r in two.values()} == {0, 1} and {r["world"] for r in two.values()} == {2}


def test_a_flow_the_probe_cannot_tell_is_checked_after_loading(folders, tmp_path, capsys, monkeypatch):
    """A hub id is told apart only once loaded: the same refusal then comes from the run."""
    monkeypatch.setattr(flows, "probe", lambda model: None)
    assert evaluate("--model", folders["schnell"], "--demo", 1, "--methods", "edict", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "is a flow-matching model (flux); the peers (edict)" in err and not (tmp_path / "o" / "rows.jsonl").exists()
