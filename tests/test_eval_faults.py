"""Issue 25, `renoise eval`: faults and bad inputs. Two concurrent runs into one folder, changed
inputs, a killed rank (torchrun, SIGKILL), a foreign line in a rows file, bad records; each ends
with every pair's row exactly once and current. Tiny random-weight model, 32 px images, 2 steps."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renoise.__main__ import main
from renoise.evaluation import store

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


def picture(path, seed=0, size=32):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def dataset(folder, records, images=("a", "b")):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(images):
        picture(folder / f"{name}.png", seed=i)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


GOOD = [{"image": "a.png", "prompt": "a red circle", "edit_prompt": "a green circle"},
        {"image": "b.png", "prompt": "a blue square"}]


def evaluate(*argv):
    return main(["eval", *map(str, argv), "--threads", "1", "--quiet", "--no-plots"])


def command(model, data, out, *methods):
    return ["--model", model, "--images", data, *STEPS, "--methods", *methods, "--out", out]


def all_rows(out):
    """Every line of every rank file (each pair must appear once)."""
    return [json.loads(line) for p in sorted((Path(out) / "rows").glob("rank-*.jsonl"))
            for line in p.read_text().splitlines()]


def merged(out):
    return {(r["image"], r["method"]): r for r in map(json.loads, (Path(out) / "rows.jsonl").read_text().splitlines())}


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_each_pair_once_and_current(out, pairs, data=None):
    rows = merged(out)
    assert sorted(rows) == sorted(pairs) and len((Path(out) / "rows.jsonl").read_text().splitlines()) == len(pairs)
    if data is not None:                                  # the prompts the captions file says now
        lines = map(json.loads, (data / "captions.jsonl").read_text().splitlines())
        captions = {r.get("id") or Path(r["image"]).stem: r for r in lines
                    if isinstance(r.get("image"), str) and isinstance(r.get("prompt"), str)}
        for (image, _), row in rows.items():
            if image in captions and row["status"] == "ok":
                assert row["prompt"] == captions[image]["prompt"]
                assert row.get("edit_prompt") == captions[image].get("edit_prompt")
    return rows


def eval_process(argv, worker=False, kill=False):
    """`python -m renoise eval` as a process of its own (not torchrun); kill: tests/eval_worker.py
    kills it (SIGKILL) right after it appends its first row."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "EVAL_KILL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **({"RANK": "0", "EVAL_KILL_RANK": "0"} if kill else {}))
    entry = [str(Path(__file__).with_name("eval_worker.py"))] if kill else ["-m", "renoise"]
    return subprocess.Popen([sys.executable, *entry, "eval", *map(str, argv), "--threads", "1", "--quiet",
                             "--no-plots", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def has_open(pid, path) -> bool:
    """Whether process `pid` has `path` open (Linux /proc)."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def torchrun(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("EVAL_KILL_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("eval_worker.py")), "eval", *map(str, argv), "--device", "cpu",
           "--threads", "1", "--quiet", "--no-plots"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------ faults

def test_two_concurrent_runs_do_each_pair_once_and_keep_both_plans(model, tmp_path):
    """Two runs started together into one folder: the second waits for the first's lock, then runs
    only what is missing. run.json keeps both runs' methods; a changed plan is still refused."""
    import fcntl
    data = dataset(tmp_path / "data", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    lock = os.open(out / store.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)                     # held here until both runs wait on it: they contend
    first = eval_process(command(model, data, out, "plain"))
    second = eval_process(command(model, data, out, "plain", "K2:iters=2,average=false"))
    deadline = time.monotonic() + 240
    while not all(has_open(p.pid, out / store.LOCK) for p in (first, second)):
        assert time.monotonic() < deadline and first.poll() is None and second.poll() is None
        time.sleep(0.1)
    time.sleep(1.5)                                      # they wait: nothing written while the lock is held
    assert not (out / "run.json").exists() and not (out / "rows").exists()
    assert first.poll() is None and second.poll() is None
    os.close(lock)
    for p in (first, second):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    lines = all_rows(out)
    pairs = [(i, m) for i in ("a", "b") for m in ("plain", "K2")]
    assert sorted((r["image"], r["method"]) for r in lines) == sorted(pairs)          # each pair once
    assert set(json.loads((out / "run.json").read_text())["methods"]) == {"plain", "K2"}
    assert evaluate(*command(model, data, out, "plain", "K2:iters=2,average=false")) == 0
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["pairs_run"] == 0
    assert_each_pair_once_and_current(out, pairs, data)         # rows.jsonl: the last run's methods, all 4
    assert evaluate(*command(model, data, out, "K2:iters=3,average=false")) == 2       # same name, other plan
    assert len(all_rows(out)) == 4


def test_changed_inputs_are_redone_and_reported(model, tmp_path, capsys):
    data = dataset(tmp_path / "data", GOOD)
    out = tmp_path / "out"
    methods = ["plain", "K2:iters=2,average=false"]
    assert evaluate(*command(model, data, out, *methods)) == 0
    before = merged(out)
    captions = [dict(GOOD[0], prompt="a red circle on the left"), GOOD[1]]          # a caption changed
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    picture(data / "b.png", seed=7)                                                 # an image replaced
    capsys.readouterr()
    assert main(["eval", *map(str, command(model, data, out, *methods)), "--threads", "1", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "4 pair(s) redone because their inputs" in err and "a (plain)" in err
    rows = assert_each_pair_once_and_current(out, [(i, m) for i in "ab" for m in ("plain", "K2")], data)
    assert rows[("a", "K2")]["prompt"] == "a red circle on the left"
    assert rows[("b", "plain")]["psnr"] != before[("b", "plain")]["psnr"]            # the new image's numbers
    s = json.loads((out / "summary.json").read_text())
    assert sorted((c["image"], c["method"]) for c in s["inputs_changed"]) == sorted(rows)
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[-1])["pairs_changed"] == 4
    # --prompt fills a record without a prompt: changing it redoes only that record's pairs
    (data / "captions.jsonl").write_text(json.dumps(captions[0]) + "\n" + json.dumps({"image": "b.png"}) + "\n")
    assert evaluate(*command(model, data, out, *methods), "--prompt", "a blue square") == 0
    log = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert (log["pairs_run"], log["pairs_changed"]) == (0, 0)                        # same text as before
    assert evaluate(*command(model, data, out, *methods), "--prompt", "a blue disc") == 0
    log = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert (log["pairs_run"], log["pairs_changed"]) == (2, 2)
    assert merged(out)[("b", "K2")]["prompt"] == "a blue disc"


def test_killed_run_foreign_line_and_bad_records_under_torchrun(model, tmp_path, capsys):
    """A run is killed (SIGKILL) after its first row; a foreign line then makes the rerun refuse
    the folder in one line, writing nothing; without it a torchrun rerun on 2 processes finishes
    every pair exactly once, bad records reported and skipped (no rank stops)."""
    records = GOOD + [{"image": "a.png", "id": "a5", "prompt": "x", "edit_prompt": 5},
                      {"image": "a.png", "id": "a6", "prompt": ["a", "list"]},
                      {"image": "a.png", "id": "a7", "prompt": "x", "edit_prompt": {"text": "y"}},
                      {"image": "a.png", "id": "a8", "prompt": "x", "mask": 5}]
    data = dataset(tmp_path / "data", records)
    out = tmp_path / "out"
    argv = command(model, data, out, "plain", "K2:iters=2,average=false")
    killed = eval_process(argv, worker=True, kill=True)                  # SIGKILL after its first row
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    done = store.read_rows(out)
    assert len(done) == 1
    rank0 = out / "rows" / "rank-0.jsonl"
    rank0.parent.mkdir(exist_ok=True)
    for foreign, problem in ((b'["a", "list"]\n', "list"), (b'{"method": "plain", "status": "ok"}\n', "'image'")):
        kept = rank0.read_bytes() if rank0.exists() else b""
        rank0.write_bytes(kept + foreign)
        before = snapshot(out)
        capsys.readouterr()
        assert evaluate(*argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(rank0) in err and "line" in err and problem in err, err
        assert snapshot(out) == before                            # nothing written, run.json included
        rank0.write_bytes(kept)
    rerun = torchrun(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = ["a", "b", "a5", "a6", "a7", "a8"]
    rows = assert_each_pair_once_and_current(out, [(i, m) for i in ids for m in ("plain", "K2")], data)
    assert len(all_rows(out)) == 12                               # every pair exactly once, across both runs
    for i in ("a5", "a6", "a7", "a8"):
        assert rows[(i, "K2")]["status"] == "bad_input" and "must be a string" in rows[(i, "K2")]["error"]
    assert rows[("a", "K2")]["status"] == rows[("b", "plain")]["status"] == "ok"
    s = json.loads((out / "summary.json").read_text())
    assert {b["image"] for b in s["bad_inputs"]} == {"a5", "a6", "a7", "a8"}


# ------------------------------------------------------------------------------------ bad inputs

def test_ids_cannot_leave_the_output_folder(model, tmp_path):
    outside = tmp_path / "outside"
    records = [{"image": "a.png", "prompt": "x", "id": "../../../outside/x"},
               {"image": "a.png", "prompt": "x", "id": str(outside / "y")},
               {"image": "b.png", "prompt": "x", "id": "sub/ok"},
               {"prompt": "no image", "id": "c"}, {"image": "a.png", "prompt": "bad \udcff text", "id": "d"}]
    data = dataset(tmp_path / "data", records)
    out = tmp_path / "deep" / "out"
    assert evaluate(*command(model, data, out, "plain"), "--save-images", "--save-inversions") == 0
    rows = merged(out)
    for bad in ("../../../outside/x", str(outside / "y")):
        assert rows[(bad, "plain")]["status"] == "bad_input" and "plain relative name" in rows[(bad, "plain")]["error"]
    assert rows[("sub/ok", "plain")]["status"] == "ok"
    assert "no 'image' field" in rows[("c", "plain")]["error"] and "UTF-8" in rows[("d", "plain")]["error"]
    assert (out / "images" / "plain" / "sub" / "ok_reconstruction.png").is_file()
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "deep"]


@pytest.mark.parametrize("case", ["threads", "edit-guidance", "guidance", "seed", "prompt"])
def test_bad_arguments_exit_2_and_create_nothing(case, model, tmp_path, capsys):
    data = dataset(tmp_path / "data", GOOD)
    flag, value = {"threads": ("--threads", "-1"), "edit-guidance": ("--edit-guidance", "nan"),
                   "guidance": ("--guidance", "inf"), "seed": ("--seed", str(10 ** 30)),
                   "prompt": ("--edit-prompt", "a \udcff")}[case]
    argv = ["eval", *map(str, command(model, data, tmp_path / "out", "plain")), "--quiet", "--no-plots", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_captions_files_that_are_not_captions(model, tmp_path, capsys):
    data = dataset(tmp_path / "data", GOOD)
    (data / "captions.jsonl").unlink()
    out = tmp_path / "out"
    cases = {
        "header only": ("captions.csv", b"image,prompt\n", "no rows"),
        "not UTF-8": ("captions.csv", b"image,prompt\na.png,caf\xe9\n", "line 2: not UTF-8"),
        "jsonl not UTF-8": ("captions.jsonl", b'{"image": "a.png", "prompt": "x"}\n{"image": "b\xff"}\n',
                            "line 2: not UTF-8"),
    }
    for name, (file, text, message) in cases.items():
        for f in ("captions.csv", "captions.jsonl"):
            (data / f).unlink(missing_ok=True)
        (data / file).write_bytes(text)
        capsys.readouterr()
        assert evaluate(*command(model, data, out, "plain")) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and file in err, (name, err)
        assert not out.exists()
    methods = tmp_path / "methods.txt"
    methods.write_bytes(b"plain\nK2:iters=2 # \xff\n")
    assert evaluate(*command(model, data, out, f"@{methods}")) == 2
    assert "methods.txt, line 2: not UTF-8" in capsys.readouterr().err
    (data / "captions.jsonl").unlink()
    (data / "captions.csv").write_bytes("\ufeffimage,prompt\na.png,a red circle\n".encode())   # a BOM
    assert evaluate(*command(model, data, out, "plain")) == 0
    assert merged(out)[("a", "plain")]["prompt"] == "a red circle"


def test_a_folder_that_is_not_an_eval_run_is_refused(model, tmp_path, capsys):
    data = dataset(tmp_path / "data", GOOD)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "rows.jsonl").write_text("my rows\n")
    before = snapshot(out)
    assert evaluate(*command(model, data, out, "plain")) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "summary.json" in err
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["rows.jsonl", "summary.json"]


def test_a_settings_file_that_is_not_an_eval_and_a_failed_start_leave_things_as_they_were(model, tmp_path, capsys):
    data = dataset(tmp_path / "data", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("[1, 2]")
    assert evaluate(*command(model, data, out, "plain")) == 2
    assert "not the settings file of a renoise eval run" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lock", "run.json"] and (out / "run.json").read_text() == "[1, 2]"
    new = tmp_path / "new"
    assert evaluate("--model", tmp_path / "no-model", "--images", data, "--methods", "plain", "--out", new) == 2
    assert not new.exists()                                     # the folder it made for its lock is gone


def test_ctrl_c_exits_130_and_the_rerun_resumes(model, tmp_path, capsys, monkeypatch):
    from renoise.evaluation import measure
    data = dataset(tmp_path / "data", GOOD)
    out = tmp_path / "out"
    real, calls = measure.measure, []

    def measure_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(measure, "measure", measure_then_interrupt)
    assert evaluate(*command(model, data, out, "plain")) == 130
    err = capsys.readouterr().err.strip()
    assert err == "renoise eval: interrupted; rerun the same command to resume"
    assert len(all_rows(out)) == 1
    monkeypatch.setattr(measure, "measure", real)
    assert evaluate(*command(model, data, out, "plain")) == 0
    assert_each_pair_once_and_current(out, [("a", "plain"), ("b", "plain")], data)
    assert len(all_rows(out)) == 2
