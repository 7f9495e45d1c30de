"""`python -m renoise eval` on a tiny random-weight model in the demo model's folder layout: method
specs, inputs and bad inputs, outputs, resuming, and sharding over 2 CPU processes with gloo
(torchrun as a subprocess: the same per-image numbers as one process, a killed rank finished by a
rerun, every pair counted once)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renoise.__main__ import main
from renoise.evaluation import data, methods, store, summary
from renoise.presets import Plan

STEPS = ["--steps", "3"]
METHODS = ["--methods", "plain", "K2:iters=2,average=false"]
NUMBERS = ("psnr", "ssim", "latent_psnr", "calls_invert", "final_residual", "edit_background_psnr", "edit_success")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A demo-shaped pipeline folder with tiny random networks (fp32). The UNet's input convolution is
    scaled down so that its output varies slowly with the latent and the inversion stays finite."""
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


def evaluate(*argv, plots=False):
    return main(["eval", *map(str, argv), "--threads", "1", "--quiet", *([] if plots else ["--no-plots"])])


def rows_of(out):
    return {(r["image"], r["method"]): r for r in map(json.loads, Path(out, "rows.jsonl").read_text().splitlines())}


def numbers(rows):
    return {k: {n: r.get(n) for n in NUMBERS} for k, r in rows.items()}


def torchrun(args, out, kill_rank=None):
    """`torchrun --nproc_per_node 2` of tests/eval_worker.py (renoise eval) on CPU with gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("EVAL_KILL_RANK", None)
    if kill_rank is not None:
        env["EVAL_KILL_RANK"] = str(kill_rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("eval_worker.py")), "eval", *map(str, args), "--out", str(out),
           "--device", "cpu", "--threads", "1", "--quiet", "--no-plots"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------ method specs

def test_method_specs_are_named_plan_overrides():
    (k3,) = methods.parse_spec("K3: iters=3, window=[3,4], weights=[1.0], average=true")
    assert k3.name == "K3" and k3.base is None
    assert k3.overrides == {"iters": 3, "window": (3, 4), "weights": (1.0,), "average": True}
    plan = k3.plan("sd15", {"sampler": "ddim", "num_steps": 10, "guidance_scale": 1.0})
    assert plan == Plan(name="K3", num_steps=10, iters=3, window=(3, 4), weights=(1.0,))
    (nokl,) = methods.parse_spec("no-kl:preset=sd15,lambda_kl=0,nc_lr=0,weights=none")
    assert nokl.base == "sd15" and nokl.overrides == {"lambda_kl": 0, "nc_lr": 0, "weights": None}
    with pytest.raises(ValueError, match="method 'no-kl'.*nc_lr must be > 0"):     # Plan's own check
        nokl.plan("sd15", {})
    run = methods.parse_spec("preset")[0].plan("sdxl-turbo", {"num_steps": 2})
    assert run == Plan.preset("sdxl-turbo").replace(name="preset", num_steps=2)
    names = [m.name for m in methods.parse_methods(["paper-grid"])]
    assert names[:5] == ["plain", "preset", "K1", "K3", "K9"] and "anderson-K5" in names
    assert [m.name for m in methods.parse_methods(["ablation"])][:3] == ["full", "no-pairwise", "no-patch-kl"]
    assert methods.parse_spec("anderson-K3")[0].overrides == {"iters": 3, "anderson": 3, "average": False}
    assert "tol-K9" in names and methods.parse_spec("tol-K9")[0].plan("demo", {}).tol == 1e-3
    per_call = {m.name: m for m in methods.parse_methods(["per-call"])}
    fast = per_call["warm-anderson-tol"].plan("demo", {"noise_correction": "optimize"})
    assert (fast.warm_start, fast.anderson, fast.tol, fast.iters, fast.noise_correction) == \
        ("previous", 3, 3e-3, 9, "optimize")
    assert per_call["K9"] == methods.parse_spec("K9")[0]           # one name, one method, in every grid
    both = [m.name for m in methods.parse_methods(["per-call", "paper-grid", "K3"])]
    assert len(both) == len(set(both)) and set(both) == set(per_call) | set(names)


def test_run_settings_apply_to_every_method():
    from types import SimpleNamespace

    from renoise.evaluation import cli
    args = SimpleNamespace(preset="demo", sampler="euler_ancestral", steps=4, guidance=None, noise_correction="optimize")
    specs = methods.parse_methods(["plain", "K3", "no-nc:noise_correction=none"])
    _, plans = cli._plans(args, None, specs)
    assert {(p.sampler, p.num_steps, p.noise_correction) for n, p in plans.items() if n != "no-nc"} == \
        {("euler_ancestral", 4, "optimize")}
    assert plans["no-nc"].noise_correction == "none"                 # a method's own setting wins
    _, plans = cli._plans(SimpleNamespace(**{**vars(args), "noise_correction": None}), None, specs)
    assert plans["K3"].noise_correction == "none"                    # Plan()'s, unless the run says


def test_method_files_and_bad_specs(tmp_path):
    f = tmp_path / "grid.txt"
    f.write_text("# my grid\nplain\nK5:iters=5,average=false   # five\n\n")
    assert [m.name for m in methods.parse_methods([f"@{f}", "sd15"])] == ["plain", "K5", "sd15"]
    bad = {"K3:iters=3,speed=2": "unknown plan field", "K3:iters": "not field=value", "x y:iters=1": "method name",
           "K3:window=[3,4": "unbalanced", "K3:iters=1,iters=2": "given twice", "nothing": "not a grid",
           "A:preset=sd99": "unknown preset", "A:name=B": "unknown plan field"}
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            methods.parse_methods([spec])
    with pytest.raises(ValueError, match="appears twice"):
        methods.parse_methods(["plain", "plain:iters=1"])
    with pytest.raises(FileNotFoundError):
        methods.parse_methods(["@" + str(tmp_path / "missing.txt")])


# ------------------------------------------------------------------------------------ inputs

def picture(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_captions_files_and_one_prompt(tmp_path):
    for name in ("a.png", "b.png"):
        picture(tmp_path / name, 16, 16)
    items = data.from_folder(tmp_path, prompt="a photo")
    assert [(i.id, i.prompt, i.problem) for i in items] == [("a", "a photo", None), ("b", "a photo", None)]
    (tmp_path / "captions.csv").write_text("image,prompt,edit_prompt\na.png,a cat,a dog\nb.png,,\n")
    a, b = data.from_folder(tmp_path)
    assert (a.prompt, a.edit_prompt) == ("a cat", "a dog") and "no caption" in b.problem
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="captions.jsonl or captions.csv"):
        data.from_folder(tmp_path / "empty")
    (tmp_path / "dup.jsonl").write_text('{"image": "a.png"}\n{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="distinct 'id'"):
        data.from_folder(tmp_path, captions=tmp_path / "dup.jsonl", prompt="x")


def test_demo_items_swap_the_shape_to_an_unused_colour():
    items = data.from_demo(20)
    for it in items:
        scene = data.demo_scene(it)
        assert it.prompt == scene.caption and it.target_colour not in scene.background
        assert it.target_colour != scene.shapes[0].colour and it.target_colour in it.edit_prompt.split()
    x, mask = data.load(items[0])
    assert x.shape == (1, 3, 128, 128) and mask.shape == (128, 128) and 0 < float(mask.mean()) < 0.5


def test_bad_inputs_are_reported_and_skipped(model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    picture(folder / "good.png", 64, 64)
    picture(folder / "odd.png", 60, 64)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[20:40, 20:40] = 255                                 # the region the edit may change
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    lines = [{"image": "good.png", "prompt": "a small red circle on the left on a blue background",
              "edit_prompt": "a small green circle on the left on a blue background", "mask": "mask.png"},
             {"image": "odd.png", "prompt": "a circle"}, {"image": "broken.png", "prompt": "a star"},
             {"image": "gone.png", "prompt": "a ring"}, {"image": "mask.png"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert evaluate("--model", model, "--images", folder, "--out", out, *STEPS, *METHODS) == 0
    s = json.loads((out / "summary.json").read_text())
    reasons = {b["image"]: b["error"] for b in s["bad_inputs"]}
    assert set(reasons) == {"odd", "broken", "gone", "mask"}
    assert "not a multiple of 8" in reasons["odd"] and "cannot read image" in reasons["broken"]
    assert "not found" in reasons["gone"] and "no caption" in reasons["mask"]
    for m in ("plain", "K2"):
        assert s["methods"][m]["images"] == 1 and s["methods"][m]["failed"] == [] and s["methods"][m]["missing"] == []
    good = rows_of(out)[("good", "K2")]
    assert good["status"] == "ok" and good["calls_invert"] == 3 * 3 and good["edit_background_psnr"] > 0
    assert "edit_success" not in good                       # a user's image: no colour checker
    assert "bad input odd" in (out / "summary.md").read_text()
    # a fixed image (its fingerprint changed) is evaluated by the rerun; the other bad inputs stay skipped
    picture(folder / "odd.png", 64, 64)
    assert evaluate("--model", model, "--images", folder, "--out", out, *STEPS, *METHODS) == 0
    s = json.loads((out / "summary.json").read_text())
    assert {b["image"] for b in s["bad_inputs"]} == {"broken", "gone", "mask"}
    assert s["methods"]["K2"]["images"] == 2 and rows_of(out)[("odd", "K2")]["status"] == "ok"
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["pairs_run"] == 2


def test_bad_arguments_exit_2(model, tmp_path, capsys):
    assert evaluate("--model", model, "--out", tmp_path / "o", *METHODS) == 2
    assert "--images DIR" in capsys.readouterr().err
    assert evaluate("--model", model, "--demo", 1, "--out", tmp_path / "o", "--methods", "K3:iters=x=") == 2
    assert evaluate("--model", tmp_path / "nothing", "--demo", 1, "--out", tmp_path / "o") == 2


# ------------------------------------------------------------------------------------ outputs, resuming

def test_demo_run_writes_rows_summary_plots_and_resumes(model, tmp_path):
    out = tmp_path / "out"
    base = ["--model", model, "--demo", 3, "--out", out, "--grid", 2]
    args = [*base, *STEPS, *METHODS, "--save-inversions"]
    assert evaluate(*args, plots=True) == 0
    rows = rows_of(out)
    assert sorted(rows) == sorted((f"demo-0000{i}", m) for i in range(3) for m in ("plain", "K2"))
    r = rows[("demo-00001", "K2")]
    assert r["calls_invert"] == 9 and r["calls_reconstruct"] == 3 and r["calls_edit"] == 3
    assert len(r["residuals"]) == 3 and [len(x) for x in r["residuals"]] == [3, 3, 3]
    assert r["final_residual"] == [x[-1] for x in r["residuals"]] and r["timesteps"] == [1, 334, 667]
    assert isinstance(r["edit_success"], bool) and r["edit_colour"] and r["peak_memory_mib"] > 0
    assert sorted(p.name for p in (out / "inversions" / "K2").iterdir()) == [f"demo-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in (out / "images" / "plain").iterdir()) == [
        "demo-00000_edit.png", "demo-00000_reconstruction.png", "demo-00001_edit.png", "demo-00001_reconstruction.png"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "contraction.png", "grid.png", "latent_psnr_vs_calls.png", "psnr_vs_calls.png", "psnr_vs_cost.png",
        "psnr_vs_seconds.png", "residuals.png"]
    assert r["evals_invert"] == 9 and r["backward_invert"] == 0 and r["cost_invert"] == 9.0
    s = json.loads((out / "summary.json").read_text())
    psnr = [rows[(f"demo-0000{i}", "plain")]["psnr"] for i in range(3)]
    assert s["methods"]["plain"]["metrics"]["psnr"]["median"] == pytest.approx(np.median(psnr))
    assert s["methods"]["K2"]["metrics"]["calls_invert"]["mean"] == 9
    assert "| plain | 3 | 0 |" in (out / "summary.md").read_text()

    # the same command again: nothing runs, the same summary
    before = (out / "summary.json").read_text()
    assert evaluate(*args, plots=True) == 0
    assert (out / "summary.json").read_text() == before
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["pairs_run"], r["pairs_skipped"]) for r in runs] == [(6, 0), (0, 6)]
    # a new method runs alone; a changed plan under an old name is refused
    assert evaluate(*base, *STEPS, *METHODS, "K1") == 0
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["pairs_run"] == 3
    assert evaluate(*base, *STEPS, "--methods", "plain:iters=1") == 2
    assert evaluate(*base, "--steps", "4", "--methods", "plain") == 2
    # a run made before a Plan field existed: the field counts as its default, so the run resumes
    settings = json.loads((out / "run.json").read_text())
    for plan in settings["methods"].values():
        del plan["relax"]
    (out / "run.json").write_text(json.dumps(settings))
    assert evaluate(*base, *STEPS, *METHODS, "K1") == 0
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["pairs_run"] == 0
    assert evaluate(*base, *STEPS, "--methods", "K1:iters=1,average=false,relax=2") == 2


def test_torn_rows_are_ignored_then_cut(tmp_path):
    w = store.RowWriter(tmp_path, 0)
    w.write({"image": "a", "method": "m", "status": "ok"})
    w.close()
    path = tmp_path / "rows" / "rank-0.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"image": "b", "method": "m", "sta')          # a write cut short by a kill
    assert list(store.read_rows(tmp_path)) == [("a", "m")]
    w = store.RowWriter(tmp_path, 0)
    w.write({"image": "c", "method": "m", "status": "ok"})
    w.close()
    assert [json.loads(x)["image"] for x in path.read_text().splitlines()] == ["a", "c"]


def test_ok_rows_and_plain_iteration_at_equal_calls(tmp_path):
    """ok_rows: a run's ok rows by method and image; at_calls: a curve of methods interpolated linearly in
    inversion calls (issue 20's "at equal calls"), held flat past its ends, images a method lacks left out."""
    w = store.RowWriter(tmp_path, 0)
    curve = {"K0": (10, 30.0), "K1": (20, 40.0), "K3": (40, 44.0)}
    for m, (calls, lat) in curve.items():
        w.write({"image": "a", "method": m, "status": "ok", "calls_invert": calls, "latent_psnr": lat})
    w.write({"image": "b", "method": "K0", "status": "ok", "calls_invert": 10, "latent_psnr": 20.0})
    w.write({"image": "b", "method": "K1", "status": "failed", "error": "RuntimeError: out of memory"})
    w.close()
    rows = store.ok_rows(tmp_path)
    assert sorted(rows) == ["K0", "K1", "K3"] and sorted(rows["K0"]) == ["a", "b"] and list(rows["K1"]) == ["a"]
    plain = ["K0", "K1", "K3"]
    assert store.at_calls(rows, "a", 15, plain) == pytest.approx(35.0)
    assert store.at_calls(rows, "a", 30, plain) == pytest.approx(42.0)
    assert store.at_calls(rows, "a", 5, plain) == 30.0 and store.at_calls(rows, "a", 90, plain) == 44.0
    assert store.at_calls(rows, "b", 25, plain) == 20.0
    assert store.at_calls(rows, "a", 20, plain, key="calls_invert") == 20.0
    assert store.at_calls(rows, "a", 30, plain, cap=41.0) == pytest.approx(40.5)        # 40 .. 44 capped at 41
    assert store.at_calls(rows, "a", 15, plain, cap=41.0) == pytest.approx(35.0)


def test_without_matplotlib_only_the_plots_are_skipped(tmp_path, monkeypatch):
    import importlib.util

    from renoise.evaluation import plots
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert plots.plot_all(tmp_path, {"methods": {}, "images": 0}, {}, [], []) == ([], plots.MISSING_NOTE)
    assert "matplotlib is not installed" in plots.MISSING_NOTE and not (tmp_path / "plots").exists()


def test_summary_statistics():
    rows = {(str(i), "m"): {"status": "ok", "psnr": float(i)} for i in range(11)}
    rows[("x", "m")] = {"status": "failed", "error": "NaN at step 3"}
    items = [data.Item(str(i), "p") for i in range(11)] + [data.Item("x", "p"), data.Item("y", "p")]
    s = summary.summarize(rows, ["m"], items, {})
    m = s["methods"]["m"]
    assert m["images"] == 11 and m["missing"] == ["y"] and m["failed"] == [{"image": "x", "error": "NaN at step 3"}]
    st = m["metrics"]["psnr"]
    assert (st["median"], st["p10"], st["p90"], st["mean"]) == (5.0, 1.0, 9.0, 5.0)
    assert st["ci95"] == pytest.approx(1.96 * np.std(np.arange(11), ddof=1) / np.sqrt(11))


# ------------------------------------------------------------------------------------ torch.distributed

def test_two_processes_after_a_killed_rank_finish_the_numbers_of_one(model, tmp_path):
    """Rank 1 of a 2-process run is killed after its first row (torchrun then stops rank 0 too); the
    same command again runs only the missing pairs, on both ranks, and every row, made by 2-process
    runs, holds the numbers of a 1-process run; each pair is counted once."""
    args = ["--model", model, "--demo", 3, *STEPS, *METHODS]
    assert evaluate(*args, "--out", tmp_path / "one") == 0
    one = numbers(rows_of(tmp_path / "one"))

    out = tmp_path / "two"
    killed = torchrun(args, out, kill_rank=1)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    first = store.read_rows(out)
    assert 1 <= len(first) < 6 and not (out / "summary.json").exists()
    rerun = torchrun(args, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = json.loads((out / "runs.jsonl").read_text())
    assert (log["world"], log["pairs_run"], log["pairs_skipped"]) == (2, 6 - len(first), len(first))
    final = rows_of(out)
    assert numbers(final) == one and len((out / "rows.jsonl").read_text().splitlines()) == 6
    assert all(final[k] == v for k, v in first.items())        # finished rows were not redone
    assert {r["rank"] for k, r in final.items() if k not in first} == {0, 1}
    assert {r["world"] for r in final.values()} == {2}
    s = json.loads((out / "summary.json").read_text())
    reference = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s["images"] == 3 and list(s["methods"]) == ["plain", "K2"]
    for name, m in s["methods"].items():
        assert m["images"] == 3 and not m["missing"] and not m["failed"]
        assert m["metrics"]["psnr"] == reference["methods"][name]["metrics"]["psnr"]
