"""`python -m renoise eval`: the arguments (`add_parser`) and the run (`run`).

    python -m renoise eval --model demo --demo 64 --methods paper-grid --out eval-out/
    torchrun --nproc_per_node 4 -m renoise eval --model M --images data/ --methods plain K3:iters=3,average=false --out o/

Each process takes every world-th pending (image, method) pair and appends its rows as they finish;
rank 0 then writes rows.jsonl, summary.json, summary.md and the plots. Rerunning the same command
skips the pairs already done and redoes those whose inputs changed. Rank 0 holds out/.lock for the
whole run (one run at a time). See docs/eval.md.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from ..presets import NOISE_CORRECTIONS
from .methods import run_plans as _plans       # (its home: methods; the name kept for callers)

__all__ = ["add_parser", "run", "main"]



def add_parser(sub):
    """Register the `eval` subcommand on the CLI's subparsers."""
    text = "invert a data set with a grid of methods; per-image rows, a summary and plots (torchrun: sharded)"
    p = sub.add_parser("eval", help=text, description=text,
                       epilog="methods: NAME:field=value,... (a Plan override), a preset name, 'preset', "
                              "a grid (paper-grid, ablation, convergence, per-call, peers, flow-anchors), a peer "
                              "(edict, bdia, null-text, negative-prompt, aidi, fixed-point-cfg, gnri, ddim-inversion, "
                              "ddim-inversion-cfg; NAME:peer=PEER,field=value,...), or @FILE; see docs/eval.md")
    data = p.add_argument_group("data (one of --images, --demo or --set)")
    data.add_argument("--images", metavar="DIR", help="folder of images with captions.jsonl or captions.csv")
    data.add_argument("--captions", metavar="FILE", help="captions file (default: DIR/captions.jsonl or .csv)")
    data.add_argument("--prompt", metavar="TEXT", help="prompt for images without a caption (all, without a file)")
    data.add_argument("--edit-prompt", metavar="TEXT", help="edit prompt for images without their own")
    data.add_argument("--demo", type=int, metavar="N", help="N held-out demo scenes with colour-swap edits and masks")
    data.add_argument("--demo-first", type=int, default=0, metavar="K", help="first held-out scene (default: 0)")
    data.add_argument("--demo-shapes", type=int, default=1, choices=(1, 2, 3), help="most shapes per scene (default: 1)")
    data.add_argument("--set", metavar="NAME", choices=sorted(_set_names()),
                      help="a built-in set off the demo model's home ground, built into OUT/data/NAME: "
                           "other-renderer, unknown-words, photos (scikit-image's), degraded; all but photos with a "
                           "colour-swap edit and its mask per image (see docs/eval.md)")
    data.add_argument("--set-size", type=int, default=16, metavar="N",
                      help="images of --set (default: 16; photos: at most the photographs scikit-image ships)")
    data.add_argument("--size", metavar="HxW", help="scale to cover HxW and centre-crop first")
    data.add_argument("--fit", choices=("none", "crop", "resize"), default="none",
                      help="sides not multiples of 8 (flow models: 16): skip the image (none, the default), crop or "
                           "resize")

    meth = p.add_argument_group("methods")
    meth.add_argument("--methods", nargs="+", default=["paper-grid"], metavar="SPEC",
                      help="methods to compare (default: paper-grid)")
    meth.add_argument("--preset", help="the run's preset: 'preset' methods and the sampler, steps and guidance "
                                       "of all methods (default: from the model, e.g. sd15)")
    meth.add_argument("--sampler", choices=("ddim", "euler_ancestral", "lcm", "flow_euler"),
                      help="the preset's unless given (flow models: flow_euler only)")
    meth.add_argument("--steps", type=int, metavar="N", help="inversion steps (the preset's unless given)")
    meth.add_argument("--guidance", type=float, metavar="G", help="inversion guidance (the preset's unless given)")
    meth.add_argument("--noise-correction", choices=NOISE_CORRECTIONS,
                      help="noise correction of every method (stochastic samplers; default: each method's own)")
    meth.add_argument("--edit-guidance", type=float, default=1.0, metavar="G", help="edit guidance (default: 1)")
    meth.add_argument("--edit-mode", choices=("swap", "p2p"), default="swap",
                      help="edit mode of every method (renoise.editing): swap (default) or p2p (Prompt-to-Prompt)")
    meth.add_argument("--cross-replace", type=float, default=0.8, metavar="FRAC",
                      help="p2p: fraction of the steps with the source's cross-attention maps (default: 0.8)")
    meth.add_argument("--self-inject", type=float, default=0.0, metavar="FRAC",
                      help="fraction of the first steps with the source's self-attention maps (default: 0)")
    meth.add_argument("--local-blend", metavar="WORDS",
                      help="local blending on these comma-separated words, or 'auto' (the changed words)")
    meth.add_argument("--blend-threshold", type=float, default=0.3, metavar="T",
                      help="local blending threshold on the maps scaled to [0, 1] (default: 0.3)")
    meth.add_argument("--mask-edits", action="store_true",
                      help="use each image's mask (demo: the edited shape; folders: the 'mask' column) as the edit "
                           "mask: outside it the edit's latents are the source's")
    meth.add_argument("--paste-back", action="store_true",
                      help="with --mask-edits or --local-blend: outside the edit's mask the edited image is the "
                           "input's pixels (renoise.editing.paste_back); rows keep the edit's background PSNR "
                           "before it as edit_background_psnr_decoded")
    meth.add_argument("--posterior", choices=("mean", "sample"), default="mean",
                      help="encode with the VAE posterior's mean (default) or a sample")
    meth.add_argument("--seed", type=int, default=0, help="seed; each image gets its own, the same for all methods")

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun with it to resume)")
    out.add_argument("--save-images", action="store_true", help="write every reconstruction and edit as PNG")
    out.add_argument("--save-inversions", action="store_true", help="write every inversion (.safetensors)")
    out.add_argument("--grid", type=int, default=4, metavar="N", help="images in grid.png (default: 4)")
    out.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    out.add_argument("--quiet", action="store_true", help="no progress lines")

    run_ = p.add_argument_group("run")
    run_.add_argument("--model", default="demo",
                      help="'demo' (the built-in demo model, the default), a diffusers folder, a hub id or a "
                           "single-file checkpoint; SD3 / SD 3.5 / FLUX.1 (flow models) too: see --methods "
                           "flow-anchors")
    run_.add_argument("--config", metavar="FOLDER",
                      help="single-file checkpoints: a diffusers folder or hub id with the configs and tokenizers "
                           "(default: the released model of the file's kind; offline: give the folder)")
    run_.add_argument("--device", default="auto",
                      help="auto (CUDA, MPS, CPU; under torchrun: LOCAL_RANK's GPU), cpu, cuda (default: auto)")
    run_.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                      help="weights' dtype; auto: float32 on CPU, float16 (or the model's bfloat16) on GPUs")
    run_.add_argument("--variant", help="weight file variant, e.g. fp16")
    run_.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    return p


def _set_names():
    from .sets import SETS
    return SETS


def _items(args):
    from . import data
    given = [x for x in (args.images, args.demo, getattr(args, "set", None)) if x is not None]
    if len(given) != 1:
        raise ValueError("give the images with one of --images DIR (with captions), --demo N or --set NAME")
    if getattr(args, "set", None) is not None:
        if args.captions or args.prompt or args.edit_prompt:
            raise ValueError("--set images bring their own captions; drop --captions/--prompt/--edit-prompt")
        from . import sets
        folder = sets.build(args.set, Path(args.out) / "data", n=args.set_size, seed=args.seed)
        return data.from_folder(folder), {"set": args.set}      # prefix-stable: a larger --set-size adds images
    if args.demo is not None:
        if args.captions or args.prompt or args.edit_prompt:
            raise ValueError("--demo scenes bring their own captions and edits; drop --captions/--prompt/--edit-prompt")
        items = data.from_demo(args.demo, first=args.demo_first, max_shapes=args.demo_shapes)
        return items, {"demo": {"first": args.demo_first, "shapes": args.demo_shapes}}
    items = data.from_folder(args.images, captions=args.captions, prompt=args.prompt, edit_prompt=args.edit_prompt)
    return items, {"images": str(Path(args.images).resolve())}


def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _save_png(image, path):
    import io

    from .. import images as imgs
    from . import store
    buf = io.BytesIO()
    imgs.to_pil(image)[0].save(buf, format="PNG")
    store.write_atomic(path, buf.getvalue())


def _save_inversion(inv, path):
    import os
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        inv.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _inside(out: Path, path: Path) -> Path:
    """`path`, after checking that it stays inside `out` (ids are checked by data.id_problem too)."""
    if not path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"output path {path} would be outside --out {out}")
    return path


def _one_pair(args, editor, item, out, ctx, lpips, keep_images):
    """Measure one pair and save its files; returns the row (status ok, bad_input or failed)."""
    import torch

    from ..inversion import NonFiniteLatentError
    from . import data, measure
    base = {"image": item.id, "method": editor.plan.name, "prompt": item.prompt}
    try:
        x, mask = data.load(item, size=args.size_hw, fit=args.fit, multiple=getattr(args, "multiple", 8))
    except (ValueError, OSError) as e:
        return {**base, "status": "bad_input", "error": " ".join(str(e).split())}
    try:
        row, images = measure.measure(editor, item, x, mask, seed=args.seed, edit_guidance=args.edit_guidance,
                                      lpips=lpips, posterior=args.posterior, control=args.edit_control,
                                      mask_edits=args.mask_edits, paste_back=args.paste_back)
    except (NonFiniteLatentError, ValueError, torch.cuda.OutOfMemoryError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {**base, "status": "failed", "error": " ".join(str(e).split())}
    name = editor.plan.name
    if args.save_images or keep_images:
        for part in ("reconstruction", "edit", "blend_mask"):
            if part in images:
                _save_png(images[part], _inside(out, out / "images" / name / f"{item.id}_{part}.png"))
    if keep_images:
        _save_png(x, _inside(out, out / "images" / "input" / f"{item.id}.png"))
    if args.save_inversions:
        _save_inversion(images["inversion"], _inside(out, out / "inversions" / name / f"{item.id}.safetensors"))
    return {**base, "status": "ok", **row, "rank": ctx.rank, "world": ctx.world, "device": str(ctx.device)}


def _pending(keys, items, done) -> list:
    """The pairs without a current row (`done` holds only rows of the current inputs: a fixed
    file, caption or mask changes the fingerprint, so a bad input that was fixed is run again)."""
    return [k for k in keys if (items[k[0]].id, k[1]) not in done]


def _fingerprints(items, settings) -> dict:
    """{(image id, method): input_sha256} of every pair (rank 0 reads each file once)."""
    from . import data, store
    per_item = {it.id: data.fingerprint(it) for it in items}
    return {(i, n): store.pair_fingerprint(fp, plan) for n, plan in settings["methods"].items()
            for i, fp in per_item.items()}


def _progress(args, ctx, done, total, row):
    if args.quiet:
        return
    head = f"renoise eval [{ctx.rank}/{ctx.world}] {done}/{total} {row['image']} {row['method']}:"
    if row["status"] != "ok":
        print(f"{head} {row['status']}: {row['error']}", file=sys.stderr, flush=True)
    else:
        print(f"{head} PSNR {row['psnr']:.2f} dB, {row['calls_invert']} calls, {row['seconds_total']:.2f} s",
              file=sys.stderr, flush=True)


def _finish(args, out, items, plans, info, ctx, started, ran, skipped, fingerprints, changed):
    """Rank 0: merge the rows, write rows.jsonl, the summaries, the plots and a line in runs.jsonl."""
    import json

    from . import plots, store, summary
    rows = store.read_rows(out, fingerprints)
    names = list(plans)
    merged = [rows[(it.id, n)] for n in names for it in items if (it.id, n) in rows]
    store.write_atomic(out / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in merged).encode())
    s = summary.summarize(rows, names, items, info)
    store.write_json(out / "summary.json", s)
    store.write_atomic(out / "summary.md", summary.markdown(s).encode())
    written, note = [], None
    if args.plots:
        written, note = plots.plot_all(out, s, {k: v for k, v in rows.items() if k[1] in plans}, names,
                                       [it.id for it in items[:args.grid]])
    if note:
        print(f"renoise eval: note: {note}", file=sys.stderr)
    wall = time.perf_counter() - started
    log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world": ctx.world, "device": str(ctx.device),
           "pairs_run": ran, "pairs_skipped": skipped, "pairs_changed": len(changed), "wall_seconds": wall}
    store.append_line(out / "runs.jsonl", log)
    if not args.quiet:
        print(summary.markdown(s).split("\n## ")[0].rstrip())
    if changed:
        listed = ", ".join(f"{i} ({m})" for i, m in changed[:10]) + (", ..." if len(changed) > 10 else "")
        print(f"renoise eval: {len(changed)} pair(s) redone because their inputs (image, mask, prompts or plan) "
              f"changed since their rows were made: {listed}", file=sys.stderr)
    if not args.quiet:
        print(f"renoise eval: {ran} pairs run, {skipped} already done, {wall:.1f} s on {ctx.world} process(es); "
              f"wrote rows.jsonl, summary.json, summary.md{''.join(', ' + w for w in written)} to {out}",
              file=sys.stderr)
    return s


def _pending_on_rank0(ctx, out, settings, keys, items) -> tuple:
    """Rank 0 reads (and checks) the rows, then checks run.json; every rank gets the same pending
    pairs [(index, method, input_sha256)], the fingerprints and the pairs redone for changed inputs."""
    from . import store
    answer = None
    if ctx.rank == 0:
        try:
            fingerprints = _fingerprints(items, settings)
            stale = set()
            rows = store.read_rows(out, fingerprints, stale)      # foreign lines refused before any write
            store.check_settings(out, settings)
            pending = [(i, n, fingerprints[(items[i].id, n)]) for i, n in _pending(keys, items, rows)]
            changed = [(items[i].id, n) for i, n, _ in pending if (items[i].id, n) in stale]
            answer = (pending, fingerprints, changed)
        except (ValueError, OSError) as e:
            answer = e                                   # raised on every rank, not only here
    answer = ctx.broadcast(answer)
    if isinstance(answer, Exception):
        raise answer
    return answer


def _work(args, ctx, pipe, plans, items, mine, out, peer_specs=None):
    """This rank's pairs, one row appended as each finishes; returns the LPIPS scorer (for its note).
    peer_specs: {method: resolved renoise.peers spec} for the methods that are peers."""
    from ..pipeline import Editor
    from . import store
    from .measure import LPIPSScorer
    peer_specs = peer_specs or {}
    if peer_specs:
        from ..peers import editors as peer_editors
    editors = {n: peer_editors.make(pipe, p, peer_specs[n]) if n in peer_specs else Editor(pipe, p)
               for n, p in plans.items()}
    lpips = LPIPSScorer(ctx.device)
    grid_ids = {it.id for it in items[:args.grid]} if args.plots else set()
    writer = store.RowWriter(out, ctx.rank)
    try:
        for i, (index, name, input_sha256) in enumerate(mine, 1):
            item = items[index]
            row = _one_pair(args, editors[name], item, out, ctx, lpips, item.id in grid_ids)
            writer.write(_clean({**row, "input_sha256": input_sha256}))
            _progress(args, ctx, i, len(mine), row)
    finally:
        writer.close()
    return lpips


def run(args) -> dict | None:
    """Run the evaluation; returns the summary on rank 0 (None on the other ranks). Everything that
    can be checked without the model is checked before --out is created or touched."""
    import torch

    from .. import images
    from ..cli_checks import check_guidance, check_seed, check_text
    from . import distributed, methods, store

    started = time.perf_counter()
    check_guidance("--guidance", args.guidance)
    check_guidance("--edit-guidance", args.edit_guidance)
    check_seed(args.seed)
    check_text("--prompt", args.prompt)
    check_text("--edit-prompt", args.edit_prompt)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: use a number of CPU threads >= 1")
    if args.grid < 0:
        raise ValueError(f"--grid must be >= 0, got {args.grid}")
    args.edit_control = _edit_control(args)
    method_list = methods.parse_methods(args.methods)
    if args.paste_back and not (args.mask_edits or args.local_blend is not None):
        raise ValueError("--paste-back keeps the input outside the edit's mask: add --mask-edits or --local-blend")
    if args.config is not None and not Path(args.model).is_file():
        raise ValueError(f"--config applies to single-file checkpoints; {args.model} is not a file (a diffusers "
                         "folder or hub id carries its own configs): drop --config")
    from .flows import check_methods, probe
    check_methods(args, method_list, probe(args.model))     # flows: refuse what cannot run, before --out is touched
    out = Path(args.out)
    store.check_folder(out, own=("data",) if getattr(args, "set", None) is not None else ())
    items, source = _items(args)
    args.size_hw = images.parse_size(args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = distributed.setup(args.device)
    try:
        with store.locked(out, args.quiet) if ctx.rank == 0 else contextlib.nullcontext():
            return _run(args, ctx, method_list, items, source, out, started)
    finally:
        ctx.close()


def _run(args, ctx, method_list, items, source, out, started):
    """The run once rank 0 holds the folder's lock."""
    from .. import devices
    from ..models import load_pipeline
    from . import plots
    dtype = devices.resolve_dtype(args.dtype, ctx.device, devices.model_dtype(args.config or args.model))
    single = {"config": args.config, "tokenizer": args.config} if args.config is not None else {}
    pipe = load_pipeline(args.model, dtype=dtype, device=ctx.device, variant=args.variant, **single)
    from ..pipeline import family_of
    family = family_of(pipe)
    args.multiple = family.size_multiple     # image sides: 8 (UNets), 16 (flow transformers patch the latent 2×2)
    if family.name == "flow":                # a model probe() could not tell apart (a hub id): the same checks
        from .flows import FlowModel, check_methods
        check_methods(args, method_list, FlowModel(pipe.kind, pipe.guidance_embeds))
    preset, plans = _plans(args, pipe, method_list)
    settings = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "data": source,
                "preset": preset, "seed": args.seed, "posterior": args.posterior,
                "edit_guidance": args.edit_guidance, "size": args.size, "fit": args.fit,
                "methods": {n: p.to_dict() for n, p in plans.items()}}
    if args.config is not None:                                # only then: older runs resume as they were
        settings["config"] = args.config
    if args.edit_control is not None or args.mask_edits:       # only then: older runs resume as they were
        settings["edit_control"] = _control_settings(args)
    peer_specs = {m.name: m.peer for m in method_list if m.peer is not None}
    if peer_specs:
        settings["peers"] = peer_specs
    keys = [(i, n) for n in plans for i in range(len(items))]    # method-major: each rank gets every method
    pending, fingerprints, changed = _pending_on_rank0(ctx, out, settings, keys, items)
    lpips = _work(args, ctx, pipe, plans, items, pending[ctx.rank::ctx.world], out, peer_specs)
    ctx.barrier()
    if ctx.rank != 0:
        return None
    notes = [n for n in (lpips.note and f"LPIPS not measured: {lpips.note}",
                         plots.MISSING_NOTE if args.plots and not _has_matplotlib() else None) if n]
    info = {k: v for k, v in settings.items() if k not in ("methods", "peers")}
    info.update(sampler=next(iter(plans.values())).sampler, plans=settings["methods"], notes=notes,
                inputs_changed=[{"image": i, "method": m} for i, m in changed])
    return _finish(args, out, items, plans, info, ctx, started, len(pending), len(keys) - len(pending),
                   fingerprints, changed)


def _edit_control(args):
    """The EditControl of the eval's edit flags, or None for the plain swap."""
    from ..editing import EditControl
    blend = None
    if args.local_blend is not None:
        blend = tuple(w.strip() for w in args.local_blend.split(",") if w.strip())
    control = EditControl(mode=args.edit_mode, cross_replace=args.cross_replace, self_inject=args.self_inject,
                          local_blend=blend, blend_threshold=args.blend_threshold)
    return None if control.plain else control


def _control_settings(args) -> dict:
    return {"mode": args.edit_mode, "cross_replace": args.cross_replace, "self_inject": args.self_inject,
            "local_blend": args.local_blend, "blend_threshold": args.blend_threshold, "mask_edits": args.mask_edits,
            **({"paste_back": True} if args.paste_back else {})}       # only then: older runs resume as they were


BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


def main(args) -> int:
    """Run `eval` from parsed arguments: 0 on success, 2 with a one-line error for bad input."""
    try:
        run(args)
    except BAD_INPUT as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"renoise eval: error: {message}", file=sys.stderr)
        return 2
    return 0


def _has_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None
