"""Command line: `python -m renoise invert | reconstruct | edit`.

    python -m renoise edit --model stabilityai/sdxl-turbo --image cat.png --prompt "a cat" \\
        --edit-prompt "a tiger" --out out/

writes out/cat_edit.png, out/inversion.safetensors (+ .json settings, + .z0.safetensors) and
out/report.json (metrics, timings, model calls, residuals). `reconstruct` and `edit` also take
`--inversion out/inversion.safetensors` instead of inverting again, so one inversion serves
many edits. Outputs are staged in a temporary folder and moved into --out only when the whole
run succeeded. Bad input: a one-line error on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
DTYPES = ("float32", "float16", "bfloat16")
INVERSION_FILE = "inversion.safetensors"
REPORT_FILE = "report.json"


class UsageError(ValueError):
    """Bad command-line input."""


# ---------------------------------------------------------------------------------------------
# arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m renoise",
        description="ReNoise real-image inversion and editing with Stable Diffusion / SDXL weights.",
        epilog='example: python -m renoise edit --model stabilityai/sdxl-turbo --image cat.png '
               '--prompt "a cat" --edit-prompt "a tiger" --out out/')
    sub = parser.add_subparsers(dest="command", metavar="{invert,reconstruct,edit}")
    helps = {"invert": "invert images to z_T (+ noises); writes the inversion and a report",
             "reconstruct": "invert (or load an inversion) and denoise back with the source prompt",
             "edit": "invert (or load an inversion) and denoise with an edit prompt"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _common(p, name)
    return parser


def _common(p, command):
    io = p.add_argument_group("input and output")
    io.add_argument("--model", required=True, help="diffusers folder, hub id, or single-file checkpoint")
    io.add_argument("--image", action="append", default=[], metavar="FILE",
                    help="input image (repeat for a batch)" + ("" if command == "invert" else
                                                                "; optional with --inversion (for metrics)"))
    io.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                    help="source prompt: one for all images or one per image (default: \"\")")
    io.add_argument("--negative-prompt", action="append", default=None, metavar="TEXT",
                    help="negative prompt for inversion guidance > 1 (default: none; zeros for SDXL)")
    if command != "invert":
        io.add_argument("--inversion", metavar="FILE", help="a saved inversion (from a previous run) to "
                        "denoise instead of inverting again")
    if command == "edit":
        io.add_argument("--edit-prompt", action="append", default=[], required=True, metavar="TEXT",
                        help="edit prompt: one for all images or one per image")
        io.add_argument("--edit-guidance", type=float, default=1.0,
                        help="guidance scale of the edit (the source prompt is the negative)")
    io.add_argument("--out", required=True, metavar="DIR", help="output folder (created on success)")
    io.add_argument("--size", default=None, metavar="HxW", help="scale to cover HxW and centre-crop (e.g. 512 or 512x768)")
    io.add_argument("--fit", choices=("crop", "resize", "none"), default="crop",
                    help="make sides multiples of 8 by centre-cropping, resizing, or refusing")
    io.add_argument("--quiet", action="store_true", help="no progress bar")

    inv = p.add_argument_group("inversion")
    inv.add_argument("--preset", default=None,
                     help="ReNoise preset (sd14, sd15, sdxl, sdxl-turbo, lcm-lora, sdxl-turbo-reference, ...); "
                          "default: from the model (sdxl-turbo for SDXL with trailing steps, sdxl, sd15)")
    inv.add_argument("--sampler", choices=("ddim", "euler_ancestral", "lcm"), default=None, help="override the preset's")
    inv.add_argument("--steps", type=int, default=None, help="number of inversion (and denoising) steps")
    inv.add_argument("--guidance", type=float, default=None, help="inversion guidance scale (≤ 1: no CFG)")
    inv.add_argument("--strength", type=float, default=1.0, help="fraction of the chain to invert (0, 1]")
    inv.add_argument("--eta", type=float, default=None, help="DDIM eta (> 0 makes DDIM stochastic)")
    inv.add_argument("--clip-skip", type=int, default=None, help="skip the last N text-encoder layers")
    inv.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                     help="encode with the VAE posterior's sample (the reference) or its mean")
    inv.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override any plan field (value as JSON, e.g. --set renoise_iters=5); repeatable")

    run = p.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, or auto")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights' dtype")
    run.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    run.add_argument("--seed", type=int, default=0, help="seed of the run's generator (VAE sample, noises)")


def _parse_size(text):
    if text is None:
        return None
    try:
        parts = [int(s) for s in text.lower().split("x")]
    except ValueError:
        raise UsageError(f"--size {text!r}: expected N or HxW, e.g. 512 or 512x768") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise UsageError(f"--size {text!r}: expected N or HxW with positive numbers")
    return (parts[0], parts[-1])


def _parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


# ---------------------------------------------------------------------------------------------
# progress and output staging

class Progress:
    """A plain stderr progress bar: `label [#####-----] done/total  1.2s`."""

    def __init__(self, label, total=None, enabled=True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n=1):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now):
        if self.total:
            filled = min(20, int(20 * self.done / self.total))
            bar = f"[{'#' * filled}{'-' * (20 - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} model calls"
        self.stream.write(f"\r{self.label:<12} {bar}  {now - self.start:.1f}s")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


class Staging:
    """Files are written in a temporary folder beside --out and moved in by `commit()`."""

    def __init__(self, out):
        self.out = Path(out)
        anchor = self.out.parent
        while not anchor.exists():
            anchor = anchor.parent
        self.dir = Path(tempfile.mkdtemp(prefix=".renoise-partial-", dir=anchor))
        self.names = []

    def path(self, name) -> Path:
        self.names.append(name)
        return self.dir / name

    def commit(self):
        self.out.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            if (self.dir / name).exists():
                os.replace(self.dir / name, self.out / name)

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the run

def _device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_model_path(model):
    looks_local = (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
                   or model.endswith((".safetensors", ".ckpt", ".pt", ".bin")) or os.sep in model and model.count("/") != 1)
    if looks_local and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"model folder or file not found: {model}")


def _stems(paths):
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) < len(stems):
        stems = [f"{i:02d}_{s}" for i, s in enumerate(stems)]
    return stems


def _default_preset(pipe):
    if pipe.kind == "sdxl":
        return "sdxl-turbo" if pipe.scheduler_config.get("timestep_spacing") == "trailing" else "sdxl"
    return "sd15"


def _jsonable(value):
    import torch
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def run(args) -> dict:
    """Run one command; returns the report (also written to --out/report.json)."""
    import torch

    from . import images as imgs
    from . import metrics, presets
    from .pipeline import Editor, Inversion, as_prompts

    t_start = time.perf_counter()
    timings = {}
    command = args.command
    size = _parse_size(args.size)
    overrides = _parse_sets(args.set)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be ≥ 1, got {args.steps}")
    if args.preset is not None:
        presets.resolve(args.preset, **overrides)            # unknown preset / field: fail before loading
    inversion_file = getattr(args, "inversion", None)
    if command == "invert" or not inversion_file:
        if not args.image:
            raise UsageError(f"{command} needs --image (or --inversion FILE for reconstruct/edit)")
    image_paths = list(args.image)
    images = imgs.load_images(image_paths, size=size, mode=args.fit) if image_paths else None
    loaded = Inversion.load(inversion_file) if inversion_file else None
    batch = images.shape[0] if images is not None else loaded.result.z_T.shape[0]
    if images is not None and loaded is not None:
        if tuple(images.shape[-2:]) != tuple(loaded.size) or images.shape[0] != batch:
            raise UsageError(f"--image gives {images.shape[0]} image(s) of {images.shape[2]}x{images.shape[3]}, "
                             f"the inversion holds {batch} of {loaded.size[0]}x{loaded.size[1]}")
    if loaded is None:
        prompts = as_prompts(args.prompt or [""], batch)
    elif args.prompt:
        raise UsageError("--prompt cannot change a saved inversion's source prompt; invert again")
    negative = as_prompts(args.negative_prompt, batch, "negative prompt") if args.negative_prompt else None
    edit_prompts = as_prompts(args.edit_prompt, batch, "edit prompt") if command == "edit" else None
    _check_model_path(args.model)
    device, dtype = _device(args.device), getattr(torch, args.dtype)

    stage = Staging(args.out)
    try:
        from .models import load_pipeline
        t0 = time.perf_counter()
        pipe = load_pipeline(args.model, dtype=dtype, device=device, variant=args.variant)
        _sync(device)
        timings["load"] = time.perf_counter() - t0
        preset = args.preset or (loaded.extra.get("preset") if loaded else None) or _default_preset(pipe)
        sampler_opts = {"eta": args.eta} if args.eta is not None else None
        if loaded is not None:
            settings = loaded.extra.get("settings", {})
            editor = Editor(pipe, preset, sampler=settings.get("sampler"), num_steps=loaded.num_steps,
                            guidance_scale=loaded.guidance_scale, clip_skip=loaded.clip_skip,
                            plan_overrides=overrides)
        else:
            editor = Editor(pipe, preset, sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
                            strength=args.strength, clip_skip=args.clip_skip, sampler_opts=sampler_opts,
                            plan_overrides=overrides)
        generator = torch.Generator(device).manual_seed(args.seed)
        report = {"command": command, "model": args.model, "kind": pipe.kind, "preset": str(preset),
                  "device": str(device), "dtype": args.dtype, "seed": args.seed, "images": image_paths,
                  "outputs": []}

        # 1. invert (or load)
        if loaded is None:
            bar = Progress("invert", enabled=not args.quiet)
            t0 = time.perf_counter()
            inv = editor.invert(images.to(device), prompts, negative_prompts=negative, generator=generator,
                                sample_posterior=args.posterior == "sample", callback=lambda *a, **k: bar.update())
            _sync(device)
            timings["invert"] = time.perf_counter() - t0
            bar.close()
            inv.extra = {"preset": str(preset), "images": image_paths,
                         "settings": {"sampler": editor.sampler, "strength": editor.strength,
                                      "plan_overrides": overrides}}
            inv.save(stage.path(INVERSION_FILE))
            for extra in Inversion.files(stage.dir / INVERSION_FILE)[1:]:
                if extra.exists():
                    stage.names.append(extra.name)
            report["inversion"] = INVERSION_FILE
            report["model_calls"] = {"invert": _jsonable(inv.result.model_calls)}
            report["residuals"] = _jsonable(inv.result.residuals)
        else:
            inv = loaded
            report["inversion"] = str(inversion_file)
            report["model_calls"] = {}
        report["settings"] = {"sampler": editor.sampler, "num_steps": inv.num_steps,
                              "guidance_scale": inv.guidance_scale, "strength": editor.strength,
                              "prompts": inv.prompts, "negative_prompts": inv.negative_prompts,
                              "size": list(inv.size), "plan": _jsonable(_plan_dict(editor.plan))}

        # 2. denoise
        if command != "invert":
            stems = _stems(inv.extra.get("images") or [f"image{i}" for i in range(batch)])
            bar = Progress("denoise", total=inv.num_steps, enabled=not args.quiet)
            t0 = time.perf_counter()
            if command == "reconstruct":
                z, den = editor.sample(inv, negative_prompts=inv.negative_prompts, num_steps=args.steps,
                                       on_call=bar.update)
            else:
                z, den = editor.sample(inv, edit_prompts, negative_prompts=inv.prompts, num_steps=args.steps,
                                       guidance_scale=args.edit_guidance, on_call=bar.update)
                report["settings"].update(edit_prompts=edit_prompts, edit_guidance_scale=args.edit_guidance)
            _sync(device)
            timings["sample"] = time.perf_counter() - t0
            bar.close()
            report["model_calls"]["sample"] = den.calls
            t0 = time.perf_counter()
            from .pipeline import decode_latents
            out_images = decode_latents(editor.pipe, z)
            _sync(device)
            timings["decode"] = time.perf_counter() - t0
            suffix = "reconstruction" if command == "reconstruct" else "edit"
            for stem, picture in zip(stems, imgs.to_pil(out_images)):
                name = f"{stem}_{suffix}.png"
                imgs.save_image(picture, stage.path(name))
                report["outputs"].append(name)
            key = "metrics" if command == "reconstruct" else "metrics_vs_input"
            report[key] = {}
            if images is not None:
                ref = images.to(out_images.device)
                report[key]["image"] = {"psnr": _jsonable(metrics.psnr(out_images, ref)),
                                        "ssim": _jsonable(metrics.ssim(out_images, ref))}
            if inv.z0 is not None:
                report[key]["latent"] = _jsonable(metrics.latent_metrics(z, inv.z0.to(z.device)))
        timings["total"] = time.perf_counter() - t_start
        report["timings"] = timings
        with open(stage.path(REPORT_FILE), "w") as f:
            json.dump(_jsonable(report), f, indent=1)
        stage.commit()
        return report
    finally:
        stage.discard()


def _plan_dict(plan):
    import dataclasses
    return dataclasses.asdict(plan) if dataclasses.is_dataclass(plan) else {"plan": str(plan)}


BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = run(args)
    except BAD_INPUT as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"renoise {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        outs = ", ".join([report.get("inversion", "")] * (args.command == "invert") + report["outputs"])
        print(f"renoise {args.command}: wrote {outs} and {REPORT_FILE} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
