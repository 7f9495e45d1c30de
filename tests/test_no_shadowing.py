"""Nothing in a clone acts as another distribution's top-level package (issue 19).

`models/` and `kernels/` sit at the repository root but are `renoise.models` / `renoise.kernels`;
Python puts the working directory first on `sys.path` (`python -c`, `python -m pytest`), and
transformers imports Hugging Face's `kernels`. Benchmarks and examples import renoise as installed.
"""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARDED = {"kernels", "models"}          # step aside when imported under their bare names
IMPORTS = """
import transformers, transformers.integrations.hub_kernels, peft
from diffusers import StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline
import renoise.kernels, renoise.models
print(json.dumps({"path0": sys.path[0], "renoise.kernels": renoise.kernels.__file__,
                  "renoise.models": renoise.models.__file__}))
"""


def _run(code, cwd, *args):
    return subprocess.run([sys.executable, *args, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_third_party_imports_work_from_the_repo_root():
    """`python -c` from the root puts the root first on sys.path, as `python -m pytest` does."""
    r = _run("import json, sys\n" + IMPORTS, ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert os.path.abspath(got["path0"] or ".") in (str(ROOT), os.path.abspath(ROOT)) or got["path0"] == ""
    assert Path(got["renoise.kernels"]).parent.name == "kernels"
    assert Path(got["renoise.models"]).parent.name == "models"


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_bare_name_finds_the_other_distribution_or_nothing(name):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
try:
    import {name}
except ModuleNotFoundError as e:
    print("missing:", e)
else:
    print("found:", {name}.__file__)
"""
    r = _run(code, ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip()
    installed = name in importlib.metadata.packages_distributions()
    if installed:
        assert out.startswith("found:") and str(ROOT / name) not in out, out
    else:
        assert out.startswith("missing:") and f"renoise.{name}" in out, out


def test_under_pytest_transformers_finds_hugging_face_kernels():
    import kernels
    import transformers.integrations.hub_kernels  # noqa: F401
    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT / "kernels"), kernels.__file__


def _top_level_names(folder):
    names = set()
    for p in folder.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
    return names


@pytest.mark.parametrize("folder", ["", "benchmarks", "examples", "tests"])
def test_no_module_on_a_search_path_shares_a_name_with_a_distribution(folder):
    """The folders that land on sys.path (the root; a script's own folder; pytest's tests/)."""
    taken = importlib.metadata.packages_distributions()
    clashes = {n: taken[n] for n in _top_level_names(ROOT / folder) - {"renoise"} if n in taken}
    if folder == "":
        clashes = {n: d for n, d in clashes.items() if n not in GUARDED}
    assert not clashes, f"{folder or 'the root'} shadows {clashes}"


def test_benchmarks_and_examples_import_renoise_as_installed(tmp_path):
    """Every script's --help runs from elsewhere, and none of them put the repo root on sys.path."""
    scripts = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    code = f"""
import os, runpy, sys
root = {str(ROOT)!r}
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
bad = []
for script in {[str(s) for s in scripts]!r}:
    here = os.path.dirname(script)
    sys.path.insert(0, here)                    # what `python script.py` does
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            bad.append((script, "exit", e.code))
    sys.path.remove(here)
    if any(os.path.abspath(p) == root for p in sys.path):
        bad.append((script, "put the repo root on sys.path"))
print(bad)
"""
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-3000:]
