"""The import graph of renoise/ and models/ is one-way: no cycle, and every import follows the
layer table of docs/layers.md (read from that page). Imports are found with ast at any depth,
inside functions too, so a function-level import cannot hide a circle."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"renoise": ROOT / "renoise", "renoise.models": ROOT / "models", "renoise.kernels": ROOT / "kernels"}
FACADES = ("renoise", "renoise.models")     # lazy packages: importlib by name on attribute access, no static import
ONLY_FOUNDATION = ("models",)               # layers that may import nothing of renoise above the foundation
NOT_CORE = ("denoisers", "models")          # layers that never see the inversion core


def modules() -> dict:
    """Dotted name -> path, for every .py file of the three folders."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if pkg == "renoise" and parts[0] in ("models", "kernels"):
                continue                     # (not there in a clone; they live at the top level)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, known) -> set:
    """The modules of `known` that `name` imports anywhere in its file. `from X import a` counts
    as importing X.a where that is a module, else X."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[:len(base) - node.level + 1]
                target = ".".join(up + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
    return {m for m in found if m in known and m != name}


def layer_table() -> list:
    """[(layer, [patterns])] from docs/layers.md's ```layers block, highest layer first."""
    text = (ROOT / "docs" / "layers.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/layers.md has no ```layers block"
    table = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        if line[0].isspace():                # a continuation of the layer above
            table[-1][1].extend(line.split())
        else:
            layer, *patterns = line.split()
            table.append((layer, patterns))
    return table


def place(name: str, table) -> tuple:
    """(layer index counted from the bottom, layer name) of module `name`; an exact pattern beats
    a wildcard."""
    short = name[len("renoise."):]
    exact = [(i, layer) for i, (layer, pats) in enumerate(reversed(table)) if short in pats]
    wild = [(i, layer) for i, (layer, pats) in enumerate(reversed(table))
            if any(p.endswith(".*") and short.startswith(p[:-1]) for p in pats)]
    hits = exact or wild
    assert len(hits) == 1, (f"{name} is in {len(hits)} layers of docs/layers.md ({[h[1] for h in hits]}); "
                            "place it in exactly one")
    return hits[0]


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {name: imports(name, path, mods) for name, path in mods.items()}


def test_facades_import_nothing_statically():
    """renoise and renoise.models load names with importlib on first use, so they are left out of
    the graph; that only holds while their own files import no submodule."""
    mods = modules()
    for facade in FACADES:
        assert imports(facade, mods[facade], mods) <= {"renoise._clone_guard"}, facade


def test_no_import_cycle(graph):
    edges = {a: sorted(b for b in bs if b not in FACADES) for a, bs in graph.items() if a not in FACADES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node)


def test_every_module_has_a_layer(graph):
    table = layer_table()
    missing = [m for m in graph if m not in FACADES and not any(
        m[len("renoise."):] in pats or any(p.endswith(".*") and m[len("renoise."):].startswith(p[:-1]) for p in pats)
        for _, pats in table)]
    assert not missing, f"modules without a layer in docs/layers.md: {missing}"


def test_imports_follow_the_layers(graph):
    table = layer_table()
    names = [layer for layer, _ in table]
    for rule in ONLY_FOUNDATION + NOT_CORE + ("foundation", "core"):
        assert rule in names, f"docs/layers.md lost the {rule!r} layer that this test's rules name"
    wrong = []
    for a, bs in graph.items():
        if a in FACADES:
            continue
        la, name_a = place(a, table)
        for b in bs - set(FACADES):
            lb, name_b = place(b, table)
            if lb > la:
                wrong.append(f"{a} ({name_a}) imports {b} ({name_b}), a higher layer")
            elif name_a in ONLY_FOUNDATION and name_b not in (name_a, "foundation"):
                wrong.append(f"{a} ({name_a}) imports {b} ({name_b}); it may use only the foundation")
            elif name_a in NOT_CORE and name_b == "core":
                wrong.append(f"{a} ({name_a}) imports {b} (core); the inversion core stays unseen there")
    assert not wrong, "imports against docs/layers.md:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_function_level_imports(tmp_path):
    """The parser counts an import inside a function body, and relative ones."""
    mods = modules()
    assert "renoise.models.loading" in imports("renoise.devices", mods["renoise.devices"], mods)
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .inversion import invert\n    from . import samplers as s\n")
    assert imports("renoise.speed", probe, mods) == {"renoise.inversion", "renoise.samplers"}
    probe.write_text("class A:\n    def f(self):\n        from ..demo import MODEL_DIR\n"
                     "        import renoise.schedules\n")
    assert imports("renoise.models.pipeline", probe, mods) == {"renoise.demo", "renoise.schedules"}


def test_old_import_paths_are_the_moved_objects():
    """The names that moved down a layer are still found where the docs and users import them."""
    import renoise.__main__ as cli
    import renoise.cli_checks
    import renoise.compiling
    import renoise.denoisers
    import renoise.inversion
    import renoise.models
    import renoise.models.pipeline
    import renoise.models.sd_pipeline
    import renoise.models.tokenizer
    import renoise.pipeline
    import renoise.speed

    for name in ("Conditioning", "GuidedDenoiser", "guided_denoiser", "guidance_embedding", "encode_prompts",
                 "negative_conditioning", "make_time_ids", "as_prompts"):
        assert name in renoise.pipeline.__all__
        assert getattr(renoise.pipeline, name) is getattr(renoise.denoisers, name), name
    for name in ("MODES", "RECOMPILE_LIMIT", "check_mode", "compiled", "nested_region"):
        assert getattr(renoise.speed, name) is getattr(renoise.compiling, name), name
    assert renoise.models.Pipeline is renoise.models.pipeline.Pipeline is renoise.models.sd_pipeline.Pipeline
    assert renoise.__getattr__("denoisers") is renoise.denoisers      # the lazy package names the new homes
    assert renoise.__getattr__("compiling") is renoise.compiling
    assert renoise.denoisers.warn_if_truncated is renoise.models.tokenizer.warn_if_truncated
    for name in ("UsageError", "check_seed", "check_guidance", "check_text"):
        assert getattr(cli, name) is getattr(renoise.cli_checks, name), name
    # speed's compiled steps are the very regions invert / sample compile (one per function and mode)
    assert renoise.speed.compiled_step("trace") is renoise.compiling.compiled(renoise.inversion._step, "trace")
    assert (renoise.speed.compiled_denoise_step("trace")
            is renoise.compiling.compiled(renoise.inversion._denoise_step, "trace"))


def test_each_former_circle_imports_first(tmp_path):
    """Each module that used to sit in an import circle imports on its own, first, in a fresh
    module table (no other renoise module loaded before it)."""
    import subprocess
    import sys
    names = ["renoise.speed", "renoise.regularizers", "renoise.inversion", "renoise.editing", "renoise.flow",
             "renoise.pipeline", "renoise.models.single_file", "renoise.models.pipeline",
             "renoise.models.flow_pipeline", "renoise.evaluation.cli", "renoise.__main__"]
    code = ("import importlib, sys, torch\n"
            f"for name in {names!r}:\n"
            "    for key in [k for k in sys.modules if k == 'renoise' or k.startswith('renoise.')]:\n"
            "        del sys.modules[key]\n"
            "    importlib.import_module(name)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_new_schedule_kind_saves_and_loads_without_the_inversion_module(tmp_path, monkeypatch):
    """A model family with a schedule class of its own registers it in renoise.schedules; inverting
    with it, saving and loading the result need nothing of renoise.inversion (which names no kind)."""
    import dataclasses

    import torch

    import renoise
    from renoise import schedules
    from renoise.inversion import InversionResult
    from renoise.presets import Plan

    @dataclasses.dataclass(frozen=True)
    class TailFlow(schedules.FlowSchedule):       # a flow schedule of another family: one field more
        tail: float = 0.25

    monkeypatch.setitem(schedules.SCHEDULE_KINDS, "tail-flow", (TailFlow, ()))
    sch = TailFlow(shift=3.0, tail=0.5)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    den = lambda x, t: 0.5 * x      # noqa: E731 -- any velocity field
    res = renoise.invert(den, z0, sch, "flow_euler", 4, Plan(sampler="flow_euler", num_steps=4, iters=2))
    res.save(tmp_path / "inv.safetensors")
    back = InversionResult.load(tmp_path / "inv.safetensors")
    assert type(back.schedule) is TailFlow and back.schedule == sch and back.schedule.tail == 0.5
    assert torch.equal(renoise.sample(den, back), renoise.sample(den, res))
    monkeypatch.delitem(schedules.SCHEDULE_KINDS, "tail-flow")
    with pytest.raises(ValueError, match="TailFlow"):
        res.save(tmp_path / "again.safetensors")
    import renoise.inversion
    tree = ast.parse(Path(renoise.inversion.__file__).read_text())
    classes = {"Schedule", "FlowSchedule"}      # named there in imports and annotations only
    used = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Call, ast.Compare))
            and classes & {x.id for x in ast.walk(n) if isinstance(x, ast.Name)}]
    kinds = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "discrete"]
    assert not used and not kinds, (used, kinds)


def test_a_file_without_schedule_kind_is_read_as_discrete(tmp_path):
    """Inversion files written before schedule kinds existed carry none: a discrete Schedule."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    import renoise
    from renoise.inversion import InversionResult
    from renoise.presets import Plan
    from renoise.schedules import Schedule

    sch = Schedule.create()
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    res = renoise.invert(lambda x, t: 0.1 * x, z0, sch, "ddim", 3, Plan(sampler="ddim", num_steps=3, iters=1))
    res.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert meta.pop("schedule_kind") == "discrete"
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    back = InversionResult.load(tmp_path / "old.safetensors")
    assert type(back.schedule) is Schedule and torch.equal(back.schedule.alphas_cumprod, sch.alphas_cumprod)
    assert back.chain == res.chain


def test_a_new_model_family_is_one_entry_in_the_pipeline(monkeypatch):
    """The Editor asks the pipeline's family (renoise.pipeline.FAMILIES) for its sampler, schedule,
    denoiser, size rule and attention control: a family added there (here a linear "model" on the
    demo model's VAE) inverts and reconstructs with no change to the loop or the Editor."""
    import dataclasses

    import torch

    import renoise
    from renoise import pipeline
    from renoise.models import load_pipeline
    from renoise.schedules import Schedule

    class Linear:
        def __init__(self):
            self.evals, self.ts = 0, []

        def __call__(self, x, t):
            self.evals += 1
            self.ts.append(int(t))
            return 0.1 * x

    made = []

    class ToyFamily:
        name, description, sampler, size_multiple = "toy", "toy model", "ddim", 32
        attention_control, needs_encoding = False, False

        @staticmethod
        def handles(pipe):
            return pipe.kind == "toy"

        def __init__(self, pipe):
            self.default_schedule = Schedule.from_config(pipe.scheduler_config)
            self.network = pipe.vae

        def schedule(self, latent_hw):
            return self.default_schedule

        def denoiser(self, cond, uncond, guidance_scale, schedule, sampler, *, prompts, size, negative_prompts):
            assert cond is None and sampler == "ddim"
            made.append(Linear())
            return made[-1]

    monkeypatch.setattr(pipeline, "FAMILIES", (ToyFamily,) + pipeline.FAMILIES)
    toy = dataclasses.replace(load_pipeline("demo"), kind="toy")
    plan = renoise.presets.Plan(name="K9", sampler="euler_ancestral", num_steps=4, iters=9, window=(9, 10),
                                average=False)
    with pytest.raises(ValueError, match="toy is a toy model: it runs with the 'ddim' sampler"):
        pipeline.Editor(toy, plan, sampler="lcm")
    editor = pipeline.Editor(toy, plan.replace(sampler="ddim"))
    assert editor.plan.sampler == "ddim" and isinstance(editor.family, ToyFamily)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.raises(ValueError, match="toy models need multiples of 32"):
        editor.invert(x[..., :48, :48], "a scene")
    with torch.no_grad():
        inv = editor.invert(x, "a scene", sample_posterior=False)
        z, den = editor.reconstruct_latents(inv)
    assert inv.result.model_calls == made[0].evals == 4 * 10 and den is made[1] and den.evals == 4
    assert set(made[0].ts) <= {t for pair in editor.schedule.chain(4, "ddim") for t in pair}   # the family's schedule
    assert (z - inv.z0).abs().max() < 1e-4 * inv.z0.abs().max()          # the linear model's fixed points: exact
    with pytest.raises(ValueError, match="take plain edits only"):
        from renoise.editing import EditControl
        editor.edit_latents(inv, "another scene", control=EditControl(mode="p2p"))
