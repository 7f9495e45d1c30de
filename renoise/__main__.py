"""Command line: `python -m renoise invert | reconstruct | edit`.

    python -m renoise edit --model stabilityai/sdxl-turbo --image cat.png --prompt "a cat" \\
        --edit-prompt "a tiger" --out out/

writes out/cat_reconstruction.png (the source prompt's denoising; `--no-reconstruction` skips
it), out/cat_edit.png, out/inversion.safetensors (settings in its metadata) and out/report.json
(device, dtype, metrics, timings and model calls per part, residuals). `reconstruct` and `edit`
also take `--inversion out/inversion.safetensors` instead of inverting again, so one inversion
serves many edits. `--device auto` / `--dtype auto` (the defaults) pick CUDA, MPS or CPU and
fp16 / bf16 / fp32 (see renoise.devices). Progress bars (tqdm) and a summary go to stderr /
stdout; `--quiet` prints nothing but errors. Outputs are staged in a temporary folder and moved
into --out only when the whole run succeeded. Bad input: a one-line error on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .cli_checks import UsageError, check_guidance, check_seed, check_text

EXIT_BAD_INPUT = 2
DTYPES = ("auto", "float32", "float16", "bfloat16")
INVERSION_FILE = "inversion.safetensors"
REPORT_FILE = "report.json"


# ---------------------------------------------------------------------------------------------
# arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m renoise",
        description="ReNoise real-image inversion and editing with Stable Diffusion / SDXL weights.",
        epilog='examples: python -m renoise edit --image examples/scene.png --prompt "a large red circle in the '
               'center on a blue background" --edit-prompt "a large green circle in the center on a blue '
               'background" --out out/   (the built-in demo model);  python -m renoise edit --model '
               'stabilityai/sdxl-turbo --image cat.png --prompt "a cat" --edit-prompt "a tiger" --out out/')
    sub = parser.add_subparsers(dest="command", metavar="{invert,reconstruct,edit,eval}")
    helps = {"invert": "invert images to z_T (+ noises); writes the inversion and a report",
             "reconstruct": "invert (or load an inversion) and denoise back with the source prompt",
             "edit": "invert (or load an inversion) and denoise with an edit prompt"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p, name)
        _plan_flags(p)
    from .evaluation.cli import add_parser as add_eval_parser      # its own module: renoise.evaluation
    add_eval_parser(sub)
    return parser


def _common(p, command):
    io = p.add_argument_group("input and output")
    io.add_argument("--model", default="demo",
                    help='diffusers folder, hub id, or single-file checkpoint; default "demo": the small trained '
                         'demo model shipped with renoise (128 px scenes of coloured shapes; runs offline); '
                         '"demo-flow": its rectified-flow sibling (SD3 layout), also shipped and offline. '
                         'Single files: SD 1.x/2.x/SDXL, an SD3/3.5 single file (all-in-one or transformer-only) '
                         'or a Black Forest Labs FLUX.1 file; these hold no tokenizers, so give --config the '
                         'diffusers folder or hub id of the matching model (it also gives what the file lacks)')
    io.add_argument("--image", action="append", default=[], metavar="FILE",
                    help="input image (repeat for a batch)" + ("" if command == "invert" else
                                                                "; optional with --inversion (for metrics)"))
    io.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                    help="source prompt: one for all images or one per image (default: empty)")
    io.add_argument("--negative-prompt", action="append", default=None, metavar="TEXT",
                    help="negative prompt for inversion guidance > 1 (default: none; zeros for SDXL)")
    if command != "invert":
        io.add_argument("--inversion", metavar="FILE", help="a saved inversion (from a previous run) to "
                        "denoise instead of inverting again")
    if command == "edit":
        io.add_argument("--edit-prompt", action="append", default=[], required=True, metavar="TEXT",
                        help="edit prompt: one for all images or one per image")
        io.add_argument("--edit-guidance", type=float, default=1.0, metavar="G",
                        help="guidance scale of the edit; the source prompt is the negative (default: 1.0)")
        io.add_argument("--no-reconstruction", action="store_true",
                        help="skip the reconstruction (by default edit also denoises with the source prompt, "
                             "writes <image>_reconstruction.png and reports its PSNR/SSIM)")
        _edit_flags(p)
    io.add_argument("--out", required=True, metavar="DIR", help="output folder (created on success)")
    io.add_argument("--size", default=None, metavar="HxW", help="scale to cover HxW and centre-crop (e.g. 512 or 512x768)")
    io.add_argument("--fit", choices=("crop", "resize", "none"), default="crop",
                    help="make sides multiples of 8 by centre-cropping, resizing, or refusing (default: crop)")
    io.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bars, no summary)")

    inv = p.add_argument_group("inversion")
    inv.add_argument("--preset", default=None,
                     help="ReNoise preset (sd14, sd15, sdxl, sdxl-turbo, lcm-lora, sdxl-turbo-reference, demo, "
                          "demo-damped, demo-exact, demo-4, demo-euler-4, demo-flow, demo-flow-fast, flow, "
                          "flux-schnell, flux-dev, sd35-large-turbo, sd3-medium; the flow-inversion anchors "
                          "euler-inversion, rf-solver, fireflow, rf-inversion, uni-inv, ftedit); "
                          "default: from the model (demo for the demo model, demo-flow for demo-flow, sdxl-turbo "
                          "for SDXL with trailing steps, sdxl, sd15; FLUX.1: flux-dev with a guidance embedding, "
                          "else flux-schnell; SD3 / 3.5: sd35-large-turbo when the model's id or path says "
                          "turbo, else sd3-medium)")
    inv.add_argument("--sampler", choices=("ddim", "euler_ancestral", "lcm"), default=None,
                     help="the preset's unless given")
    inv.add_argument("--steps", type=int, default=None, metavar="N",
                     help="number of inversion (and denoising) steps (the preset's unless given)")
    inv.add_argument("--guidance", type=float, default=None, metavar="G",
                     help="inversion guidance scale, <= 1: no CFG (the preset's unless given)")
    inv.add_argument("--strength", type=float, default=None, metavar="S",
                     help="invert only the last int(S*steps) steps, 0 < S <= 1 (default: 1)")
    inv.add_argument("--eta", type=float, default=None, help="DDIM eta (> 0 makes DDIM stochastic)")
    inv.add_argument("--clip-skip", type=int, default=None, metavar="N", help="skip the last N text-encoder layers")
    inv.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                     help="encode with the VAE posterior's sample (the reference's choice) or its mean "
                          "(default: sample)")

    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 or mps (default: auto)")
    run.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="model weights' dtype; auto: float16 on CUDA/MPS (bfloat16 when the model's config asks "
                          "for it), float32 on CPU (default: auto)")
    run.add_argument("--variant", default=None,
                     help="weight file variant, e.g. fp16 (default: fp16 files when the dtype is half precision "
                          "and the model has them, else the default files)")
    run.add_argument("--config", default=None, metavar="FOLDER",
                     help="single-file checkpoints: a diffusers folder or hub id with the configs and tokenizers "
                          "(default: the released model of the sniffed kind)")
    run.add_argument("--allow-pickle", action="store_true",
                     help="allow pickle checkpoints (.ckpt/.bin), loaded with weights_only=True")
    run.add_argument("--lora", default=None, metavar="FILE",
                     help="merge a LoRA into the model first (e.g. LCM-LoRA with --preset lcm-lora); "
                          "with --inversion: the one it was made with, unless given")
    run.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="LoRA strength (default: 1)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the run's generator: VAE sample, noises, regularizer shifts (default: 0)")
    run.add_argument("--compile", dest="compile", action="store_const", const="compile", default=None,
                     help="run every inversion and denoising step as one torch.compile region (inductor); "
                          "the first image pays the compilation (renoise.speed)")
    run.add_argument("--cuda-graphs", dest="compile", action="store_const", const="cuda-graphs",
                     help="--compile, and replay each step as a CUDA graph (CUDA only)")


def _edit_flags(p):
    """Editing modes (renoise.editing): the edit branch beside the source branch, steered by attention."""
    g = p.add_argument_group("editing modes (renoise.editing; any of them runs source and edit as one batch)")
    g.add_argument("--mode", choices=("swap", "p2p"), default="swap",
                   help="swap: the edit prompt alone (default); p2p: Prompt-to-Prompt, the edit's cross-attention "
                        "maps are the source's (token-aligned) for the first --cross-replace of the steps")
    g.add_argument("--cross-replace", type=float, default=0.8, metavar="FRAC",
                   help="p2p: fraction of the steps with the source's cross-attention maps (default: 0.8)")
    g.add_argument("--self-inject", type=float, default=0.0, metavar="FRAC",
                   help="fraction of the first steps whose self-attention takes the source's (default: 0, off)")
    g.add_argument("--self-inject-kind", choices=("maps", "kv"), default="maps",
                   help="self-injection of the source's attention maps or of its keys and values (default: maps)")
    g.add_argument("--reweight", action="append", default=[], metavar="WORD=X",
                   help="scale the edit's cross-attention on WORD by X (repeatable), e.g. --reweight green=2")
    g.add_argument("--local-blend", default=None, metavar="WORDS",
                   help="comma-separated words (or 'auto': the words the edit changes) whose cross-attention "
                        "maps make the mask where the edit may change the source")
    g.add_argument("--blend-threshold", type=float, default=0.3, metavar="T",
                   help="local blend: threshold on the maps scaled to [0, 1] (default: 0.3)")
    g.add_argument("--blend-start", type=float, default=0.2, metavar="FRAC",
                   help="local blend: first blended step as a fraction of the steps (default: 0.2)")
    g.add_argument("--mask", default=None, metavar="FILE",
                   help="image of the input's size, white where the edit may change the image; outside it the "
                        "latents are the source's at every step")
    g.add_argument("--paste-back", action="store_true",
                   help="outside the edit's mask (--mask, else the --local-blend mask) the output is the input's "
                        "pixels exactly, not the VAE's decoding of them (needs --image)")
    g.add_argument("--feather", type=int, default=0, metavar="PX",
                   help="--paste-back: soft edge of PX pixels outside the mask (default: 0, a hard edge)")
    g.add_argument("--save-attention", action="store_true",
                   help="write each token's cross-attention map (averaged over layers and steps) as a PNG grid "
                        "per branch: <image>_attention_source.png, <image>_attention_edit.png")


def _edit_control(args, images_size, size=None):
    """The EditControl of the edit flags (None for a plain swap); the mask is read and fitted like the
    images (--size, --fit) and must then have their size."""
    from .editing import EditControl
    weights = []
    for item in args.reweight:
        word, eq, value = item.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not eq or not word.strip() or factor is None or factor < 0:
            raise UsageError(f"--reweight takes WORD=X with X >= 0 (e.g. green=2), got {item!r}")
        weights.append((word.strip(), factor))
    blend = None
    if args.local_blend is not None:
        blend = tuple(w.strip() for w in args.local_blend.split(",") if w.strip())
        if not blend:
            raise UsageError("--local-blend needs words (comma-separated) or 'auto'")
    mask = None
    if args.mask is not None:
        from . import images as imgs
        if not Path(args.mask).is_file():
            raise FileNotFoundError(f"mask file not found: {args.mask}")
        m = imgs.to_tensor(imgs.load_image(args.mask, size=size, mode=args.fit))
        if images_size is not None and tuple(m.shape[-2:]) != tuple(images_size):
            raise UsageError(f"--mask {args.mask} is {m.shape[-2]}x{m.shape[-1]} but the images are "
                             f"{images_size[0]}x{images_size[1]}")
        mask = ((m[0].mean(0) + 1) / 2).clamp(0, 1)
    try:
        control = EditControl(mode=args.mode, cross_replace=args.cross_replace, self_inject=args.self_inject,
                              self_inject_kind=args.self_inject_kind, reweight=tuple(weights), local_blend=blend,
                              blend_threshold=args.blend_threshold, blend_start=args.blend_start, mask=mask,
                              save_attention=args.save_attention)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return None if control.plain else control


_COVERED = {"name", "sampler", "num_steps", "guidance_scale"}     # by --sampler / --steps / --guidance
_TUPLES = {"window", "weights", "first_window", "first_weights"}
_PLAN_HELP = {
    "iters": "K: renoising iterations per step (steps with t >= first-until)",
    "window": "averaging window a,b: iterations a..b-1",
    "weights": "averaging weights over the window (default: uniform)",
    "first_iters": "K for the first steps (t < first-until)",
    "first_window": "averaging window for the first steps",
    "first_weights": "averaging weights for the first steps",
    "first_until": "timestep below which the first-* settings apply",
    "average": "average the window's model outputs (false: the last iterate)",
    "lambda_ac": "edit enhancement: pairwise auto-correlation weight",
    "lambda_kl": "edit enhancement: patch-KL weight",
    "reg_rounds": "edit enhancement rounds (0: off)",
    "reg_rolls": "auto-correlation steps per round",
    "reference_noise": "noised | clean: where the reference noise map is taken",
    "noise_correction": "none | override | optimize | clip (stochastic samplers)",
    "nc_steps": "noise correction by optimisation: steps (clip: moves at most steps × lr)",
    "nc_lr": "noise correction by optimisation: step length",
    "anderson": "Anderson mixing memory, 0: off (needs --average false)",
    "relax": "step length β: each iteration moves to z + β·(G(z) - z) (1: plain; 2: over-relaxed, with --anderson)",
    "relax_start": "plain | relaxed: Anderson's adaptive relaxation takes its first plain step un-relaxed "
                   "(plain) or at --relax (relaxed)",
    "tol": "stop a step's iterations once the residual (RMS change, in the model's input scale) is <= V "
           "(none: run all K+1 calls)",
    "first_tol": "tol of the steps with t < first_until (needs tol; none: tol there too)",
    "tol_plain": "with Anderson: also stop a sample once its residual r <= r0·L^V, as far as V plain iterations "
                 "would get (r0: its first residual, L: the measured contraction; none: off)",
    "warm_start": "none | previous | previous-noise | extrapolate: start each step from the inverse step with the "
                  "previous step's model output (previous-noise: less the step's fresh noise, on stochastic steps; "
                  "extrapolate: the line through the last two steps' outputs, on deterministic steps)",
    "solver": "fixed-point (ReNoise) | euler | rf-solver | fireflow | rf-inversion | uni-inv | ftedit: the "
              "flow-inversion anchors "
              "(flow models only; renoise.flow_anchors)",
    "rf_gamma": "RF-Inversion: controller pulling the inversion towards a fixed noise, in [0, 1]",
    "rf_eta": "RF-Inversion: controller pulling sampling towards the inverted image, in [0, 1] (0: off)",
    "rf_eta_window": "RF-Inversion: start,stop fractions of the sampling steps where eta acts",
}


_UNSET = object()      # a plan flag not given (None is a value: --tol none)


def _plan_flags(p):
    """One flag per renoise.presets.Plan field, so every hyperparameter can be overridden."""
    import dataclasses

    from .presets import WORD_FIELDS, Plan
    group = p.add_argument_group(
        "plan fields (the preset's unless given; see renoise.presets.Plan)",
        "lists as a,b (e.g. --window 7,10); 'none' for None; true/false for flags")
    for f in dataclasses.fields(Plan):
        if f.name not in _COVERED:
            group.add_argument("--" + f.name.replace("_", "-"), dest="plan_" + f.name, default=_UNSET, metavar="V",
                               type=str if f.name in WORD_FIELDS else _plan_value, help=_PLAN_HELP.get(f.name))


def _plan_value(text):
    low = text.strip().lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(_number(x) for x in text.split(",") if x.strip())
    return _number(text)


def _number(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _plan_overrides(args) -> dict:
    out = {k[5:]: v for k, v in vars(args).items() if k.startswith("plan_") and v is not _UNSET}
    return {k: (v,) if k in _TUPLES and not isinstance(v, tuple) else v for k, v in out.items()}


def _parse_size(text):
    from .images import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# progress and output staging

def _bar(label, total, quiet, unit="step", **kw):
    """A tqdm progress bar on stderr (it/s and ETA); nothing when quiet."""
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit=unit, disable=quiet, file=sys.stderr, leave=True,
                dynamic_ncols=True, **kw)


@contextlib.contextmanager
def _silenced(quiet):
    """With --quiet: no Python warnings, no hub progress bars or log lines (errors still raise)."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hf_logging
    bars_were_off, level = are_progress_bars_disabled(), hf_logging.get_verbosity()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if not bars_were_off:
            enable_progress_bars()


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
        """All or nothing: a new --out is the staged folder renamed; in an existing one each file it
        replaces is first moved aside, and any failure moves everything back before it is raised."""
        umask = os.umask(0)
        os.umask(umask)
        names = [n for n in dict.fromkeys(self.names) if (self.dir / n).exists()]
        for name in names:
            os.chmod(self.dir / name, 0o666 & ~umask)
        if not self.out.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o777 & ~umask)
            os.rename(self.dir, self.out)
            return
        old = Path(tempfile.mkdtemp(prefix=".renoise-partial-", dir=self.out.parent))
        aside, moved = [], []
        try:
            for name in names:
                if (self.out / name).exists():
                    os.replace(self.out / name, old / name)
                    aside.append(name)
                os.replace(self.dir / name, self.out / name)
                moved.append(name)
        except BaseException:
            for name in moved:
                with contextlib.suppress(OSError):
                    os.replace(self.out / name, self.dir / name)
            for name in aside:
                with contextlib.suppress(OSError):
                    os.replace(old / name, self.out / name)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the run

def _device_and_dtype(args):
    """--device / --dtype, "auto" resolved by renoise.devices (the model's config may ask for bf16)."""
    from .devices import model_dtype, resolve_device, resolve_dtype
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    wanted = None
    if args.dtype == "auto" and device.type != "cpu":
        wanted = model_dtype(args.model if args.config is None else args.config)
    return device, resolve_dtype(args.dtype, device, wanted)


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_model_path(model):
    """--model must be a built-in name ("demo", "demo-flow"), an existing folder or file, or a hub id ('owner/name')."""
    from .models.loading import is_hub_id
    from .models.pipeline import BUILTIN
    if model not in BUILTIN and not is_hub_id(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"model folder or file not found: {model}")


def _stems(paths):
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) < len(stems):
        stems = [f"{i:02d}_{s}" for i, s in enumerate(stems)]
    return stems


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


def _lpips(x, y) -> dict:
    """LPIPS when its weight files are on this machine (never downloaded), else why not."""
    from . import metrics
    if min(x.shape[-2:]) < 32:
        return {"lpips": None, "lpips_note": "images smaller than 32 px: LPIPS (AlexNet) needs at least 32"}
    try:
        return {"lpips": metrics.lpips(x, y)}
    except metrics.LPIPSWeightsMissing as e:
        return {"lpips": None, "lpips_note": str(e)}


def run(args) -> dict:
    """Run one command; returns the report (also written to --out/report.json)."""
    import torch

    from . import images as imgs
    from . import presets
    from .pipeline import Editor, Inversion, as_prompts, decode_latents

    t_start = time.perf_counter()
    timings = {}
    command = args.command
    inversion_file = getattr(args, "inversion", None)
    quiet = args.quiet

    # -- check everything that can be checked before loading the model ------------------------
    size = _parse_size(args.size)
    overrides = _plan_overrides(args)
    _check_values(args)
    for flag, value, low in (("--steps", args.steps, 1), ("--clip-skip", args.clip_skip, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.preset is not None:
        presets.resolve(args.preset, **overrides)            # unknown preset or plan field
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if not args.image and not inversion_file:
        raise UsageError(f"{command} needs --image FILE" + ("" if command == "invert" else " or --inversion FILE"))
    image_paths = [str(p) for p in args.image]
    images = imgs.load_images(image_paths, size=size, mode=args.fit) if image_paths else None
    _check_model_path(args.model)
    device, dtype = _device_and_dtype(args)
    loaded = Inversion.load(inversion_file, device=device) if inversion_file else None
    if loaded is not None:
        if args.prompt:
            raise UsageError("--prompt cannot change a saved inversion's source prompt; invert again instead")
        if images is not None and (images.shape[0] != loaded.batch or tuple(images.shape[-2:]) != loaded.size):
            raise UsageError(f"--image gives {images.shape[0]} image(s) of {images.shape[2]}x{images.shape[3]} but "
                             f"the inversion holds {loaded.batch} of {loaded.size[0]}x{loaded.size[1]}")
        loaded.check_num_steps(args.steps)
        _check_against_inversion(args, loaded, overrides, inversion_file)
    lora = args.lora or (loaded.extra.get("lora") if loaded is not None else None)   # as when inverted
    if lora and not Path(lora).exists():
        raise FileNotFoundError(f"LoRA file not found: {lora}")
    lora_scale = args.lora_scale if args.lora or loaded is None else loaded.extra.get("lora_scale", 1.0)
    control = None
    if command == "edit":
        control = _edit_control(args, loaded.size if loaded is not None else tuple(images.shape[-2:]), size)
        if control is not None and args.compile is not None:
            raise UsageError("editing modes (--mode p2p, --self-inject, --reweight, --local-blend, --mask, "
                             "--save-attention) run eagerly: drop --compile / --cuda-graphs")
        _check_paste_back(args, control, images)
    batch = loaded.batch if loaded is not None else images.shape[0]
    prompts = as_prompts(args.prompt or [""], batch) if loaded is None else loaded.prompts
    negative = as_prompts(args.negative_prompt, batch, "negative prompt") if args.negative_prompt else None
    edit_prompts = as_prompts(args.edit_prompt, batch, "edit prompt") if command == "edit" else None
    parts = {"invert": [], "reconstruct": ["reconstruction"], "edit": ["reconstruction", "edit"]}[command]
    if getattr(args, "no_reconstruction", False):
        parts.remove("reconstruction")
    dtype_name = str(dtype).removeprefix("torch.")
    if not quiet:
        if args.model == "demo":
            print("renoise: model demo, the small trained demo model shipped with renoise "
                  "(pass --model for real weights, e.g. stabilityai/sdxl-turbo)", file=sys.stderr)
        if args.model == "demo-flow":
            print("renoise: model demo-flow, the small trained demo flow model (SD3 layout) shipped with renoise "
                  "(pass --model for real weights, e.g. stabilityai/stable-diffusion-3-medium-diffusers)",
                  file=sys.stderr)
        print(f"renoise {command}: device {device}, dtype {dtype_name}", file=sys.stderr)

    stage = Staging(args.out)
    try:
        from .models import load_pipeline
        from .models.loading import load_progress
        t0 = time.perf_counter()
        with _bar("load", None, quiet, unit="B", unit_scale=True, unit_divisor=1024) as bar, load_progress(bar):
            pipe = load_pipeline(args.model, dtype=dtype, device=device, variant=args.variant,
                                 allow_pickle=args.allow_pickle, config=args.config, tokenizer=args.config)
            if lora:
                from .models import merge_lora
                merge_lora(pipe, lora, lora_scale)
            _sync(device)
        timings["load"] = time.perf_counter() - t0
        generator = torch.Generator(device).manual_seed(args.seed)
        report = {"command": command, "model": args.model, "lora": lora, "lora_scale": lora_scale if lora else None,
                  "kind": pipe.kind, "device": str(device), "dtype": dtype_name, "seed": args.seed,
                  "images": image_paths, "outputs": []}

        # 1. invert, or take the saved inversion
        if loaded is None:
            from .presets import for_model
            preset = args.preset or for_model(pipe, args.model)
            editor = Editor(pipe, preset, sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
                            strength=1.0 if args.strength is None else args.strength, clip_skip=args.clip_skip,
                            plan_overrides=overrides,
                            sampler_opts={"eta": args.eta} if args.eta is not None else None, compile=args.compile)
            n = editor.plan.num_steps
            t0 = time.perf_counter()
            with _bar("inversion", min(int(n * editor.strength), n), quiet) as bar:
                inv = editor.invert(images.to(device), prompts, negative_prompts=negative, generator=generator,
                                    sample_posterior=args.posterior == "sample",
                                    callback=lambda *_: bar.update())
                _sync(device)
            timings["inversion"] = time.perf_counter() - t0
            inv.extra = {"images": image_paths, "model": args.model, "preset": str(preset), "lora": lora,
                         "lora_scale": lora_scale}
            inv.save(stage.path(INVERSION_FILE))
            report["inversion"] = INVERSION_FILE
            report["model_calls"] = {"inversion": inv.result.model_calls}
        else:
            inv = loaded
            editor = Editor(pipe, inv.result.plan, clip_skip=inv.clip_skip, compile=args.compile)
            made_with = inv.extra.get("model")
            if made_with not in (None, args.model) and not quiet:
                print(f"renoise {command}: note: the inversion was made with --model {made_with}", file=sys.stderr)
            report["inversion"] = str(inversion_file)
            report["model_calls"] = {}
        res = inv.result
        report["preset"] = inv.extra.get("preset", res.plan.name)
        report["settings"] = {"sampler": res.sampler, "num_steps": res.num_steps, "strength": editor.strength
                              if loaded is None else None, "inverted_timesteps": res.timesteps,
                              "guidance_scale": inv.guidance_scale, "prompts": inv.prompts,
                              "negative_prompts": inv.negative_prompts, "size": list(inv.size),
                              "sampler_opts": res.sampler_opts, "plan": res.plan.to_dict()}
        if command == "edit":
            report["settings"].update(edit_prompts=edit_prompts, edit_guidance_scale=args.edit_guidance,
                                      edit_mode=args.mode, edit_control=None if control is None else {
                                          "cross_replace": control.cross_replace, "self_inject": control.self_inject,
                                          "self_inject_kind": control.self_inject_kind,
                                          "reweight": [list(r) for r in control.reweight],
                                          "local_blend": control.local_blend, "blend_threshold": control.blend_threshold,
                                          "blend_start": control.blend_start, "mask": args.mask},
                                      paste_back=args.paste_back, feather=args.feather)
        report["convergence"] = res.convergence()
        report["residuals"] = {"final_per_step": [r[-1] for r in res.residuals],
                               "per_iteration": res.residuals,
                               "contraction_per_step": list(getattr(res, "contraction", []) or [])}

        # 2. denoise and decode: the reconstruction (source prompt) and/or the edit
        stems = _stems(inv.extra.get("images") or [f"image{i}" for i in range(batch)])
        for part in parts:
            t0 = time.perf_counter()
            with _bar(part, len(res.timesteps), quiet) as bar, _naming_guidance(part, inv, args):
                if part == "reconstruction":
                    z, den = editor.reconstruct_latents(inv, callback=lambda *_: bar.update())
                else:
                    z, den = editor.edit_latents(inv, edit_prompts, edit_guidance_scale=args.edit_guidance,
                                                 callback=lambda *_: bar.update(), control=control)
                    if control is not None:
                        _save_edit_pictures(pipe, den, stems, stage, report)
                out_images = decode_latents(pipe, z)
                if part == "edit" and args.paste_back:
                    from .editing import edit_mask, paste_back
                    out_images = paste_back(out_images, images.to(out_images), edit_mask(control, den), args.feather)
                _sync(device)
            timings[part] = time.perf_counter() - t0
            report["model_calls"][part] = den.calls
            for stem, picture in zip(stems, imgs.to_pil(out_images)):
                name = f"{stem}_{part}.png"
                imgs.save_image(picture, stage.path(name))
                report["outputs"].append(name)
            # reconstruction: how close to the input; edit: how much of the input survived
            key = "metrics" if part == "reconstruction" else "metrics_vs_input"
            report[key] = _metrics(z, inv.z0, out_images, images)
        timings["total"] = time.perf_counter() - t_start
        report["timings"] = timings
        report = _jsonable(report)
        with open(stage.path(REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
        stage.commit()
        return report
    finally:
        stage.discard()


def _check_paste_back(args, control, images) -> None:
    if args.feather < 0:
        raise UsageError(f"--feather {args.feather}: use a number of pixels >= 0")
    if not args.paste_back:
        if args.feather:
            raise UsageError("--feather softens --paste-back's edge: add --paste-back")
        return
    if control is None or (control.mask is None and control.local_blend is None):
        raise UsageError("--paste-back keeps the input outside the edit's mask: add --mask FILE or --local-blend WORDS")
    if images is None:
        raise UsageError("--paste-back needs the input's pixels: add --image (the inverted image) to --inversion")


def _check_values(args) -> None:
    """Numbers and texts that argparse lets through."""
    check_guidance("--guidance", args.guidance)
    check_guidance("--edit-guidance", getattr(args, "edit_guidance", None))
    check_seed(args.seed)
    for flag in ("prompt", "negative_prompt", "edit_prompt"):
        check_text("--" + flag.replace("_", "-"), getattr(args, flag, None))
    if args.strength is not None and not (0 < args.strength <= 1):
        raise UsageError(f"--strength {args.strength}: use a number in (0, 1] (1: invert every step)")


def _check_against_inversion(args, loaded, overrides, path) -> None:
    """With --inversion the inversion's own settings are used: refuse a flag that asks for others."""
    res = loaded.result
    from .pipeline import as_prompts
    made = {"--sampler": res.sampler, "--guidance": loaded.guidance_scale,
            "--preset": loaded.extra.get("preset", res.plan.name), "--clip-skip": loaded.clip_skip,
            "--eta": res.sampler_opts.get("eta"), "--negative-prompt": loaded.negative_prompts}
    given = {"--sampler": args.sampler, "--guidance": args.guidance, "--preset": args.preset,
             "--clip-skip": args.clip_skip, "--eta": args.eta,
             "--negative-prompt": None if args.negative_prompt is None else
             as_prompts(args.negative_prompt, loaded.batch, "negative prompt")}
    inverted = res.num_steps - res.start                  # the steps --strength chose when it was made
    if args.strength is not None and min(int(res.num_steps * args.strength), res.num_steps) != inverted:
        raise UsageError(f"--strength {args.strength} cannot change a saved inversion (it inverted {inverted} of "
                         f"its {res.num_steps} steps; {path}); drop --strength, or invert again with it")
    for flag, value in given.items():
        if value is not None and value != made[flag]:
            raise UsageError(f"{flag} {value!r} cannot change a saved inversion (it was made with {made[flag]!r}; "
                             f"{path}); drop {flag}, or invert again with it")
    plan = res.plan.to_dict()
    for key, value in overrides.items():
        if plan.get(key) != (list(value) if isinstance(value, tuple) else value) and \
                getattr(res.plan, key, None) != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {value!r} cannot change a saved inversion (it was made with "
                             f"{getattr(res.plan, key, None)!r}; {path}); drop {flag}, or invert again with it")


@contextlib.contextmanager
def _naming_guidance(part, inv, args):
    """A non-finite denoising names the part and the guidance flag it ran with."""
    from .inversion import NonFiniteLatentError
    try:
        yield
    except NonFiniteLatentError as e:
        flag = f"--edit-guidance {args.edit_guidance:g}" if part == "edit" else f"guidance {inv.guidance_scale:g}"
        raise NonFiniteLatentError(f"the {part} (with {flag}): {e}") from None
def _save_edit_pictures(pipe, result, stems, stage, report):
    """With an editing mode: the blend mask (<image>_blend_mask.png, latent cells as 8x8 blocks) and,
    with --save-attention, each token's cross-attention map per branch as a PNG grid."""
    from .editing import attention_grid, token_labels
    B = len(stems)
    for b, stem in enumerate(stems):
        if result.mask is not None:
            from PIL import Image
            m = (result.mask[b, 0].float().cpu() * 255).byte().numpy()
            picture = Image.fromarray(m, "L").resize((m.shape[1] * 8, m.shape[0] * 8), Image.NEAREST)
            name = f"{stem}_blend_mask.png"
            picture.save(stage.path(name))
            report["outputs"].append(name)
        if result.maps is not None:
            pad = pipe.tokenizer.pad_token_id
            for branch, ids, row in (("source", result.source_ids[b], b), ("edit", result.edit_ids[b], B + b)):
                ids = ids.tolist()
                n = ids.index(pad, 1) + 1 if pad in ids[1:] else len(ids)     # up to the first EOS/padding
                name = f"{stem}_attention_{branch}.png"
                attention_grid(result.maps[row, :n], token_labels(pipe.tokenizer, ids[:n])).save(stage.path(name))
                report["outputs"].append(name)


def _metrics(z, z0, out_images, images) -> dict:
    """Latent metrics against the inverted z0; image PSNR/SSIM (LPIPS where local) against the input."""
    from . import metrics
    out = {"latent": metrics.latent_metrics(z, z0.to(z.device))}
    if images is not None:
        ref = images.to(out_images.device)
        out["image"] = {"psnr": metrics.psnr(out_images, ref), "ssim": metrics.ssim(out_images, ref),
                        **_lpips(out_images, ref)}
    return out


def summary(report, out) -> str:
    """Where each file went and the headline numbers: reconstruction PSNR, model calls, seconds."""
    out = Path(out)
    lines = [f"renoise {report['command']}: done in {report['timings']['total']:.1f} s "
             f"(device {report['device']}, dtype {report['dtype']})"]
    rec = report.get("metrics")
    for name in report["outputs"]:
        lines.append(f"  {out / name}")
    if report["inversion"] == INVERSION_FILE:
        lines.append(f"  {out / INVERSION_FILE}")
    lines.append(f"  {out / REPORT_FILE}")
    if rec is not None:
        image = rec.get("image")
        values = image["psnr"] if image else rec["latent"]["psnr"]
        what = "image" if image else "latent (no --image given)"
        lines.append(f"reconstruction PSNR: {', '.join(f'{v:.2f}' for v in values)} dB ({what})")
    conv = report.get("convergence")
    if conv:
        lines.append("budget used per image: " + ", ".join(f"{b:.0%}" for b in conv["budget"]))
        for s in conv["not_converged"]:
            lines.append(f"warning: image {s['sample']}, inversion step {s['step']} (t={s['timestep']}) stopped above "
                         f"its tolerance: residual {s['residual']:.2g} > tol {s['tol']:.2g} after {s['calls']} calls")
        if conv["advice"]:
            lines.append(f"what to do: {conv['advice']}")
    calls = report["model_calls"]
    lines.append("model calls: " + ", ".join(f"{k} {v}" for k, v in calls.items()) + f" (total {sum(calls.values())})")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    return "\n".join(lines)


BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


EXIT_SIGINT, EXIT_SIGTERM = 130, 143           # 128 + the signal's number, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up (finally blocks) runs."""


@contextlib.contextmanager
def _signals(torchrun_worker=False):
    """SIGTERM raises Terminated in the main thread (not in a torchrun worker: torchrun manages its
    workers' signals); SIGINT raises KeyboardInterrupt as usual. The old handler comes back after."""
    import signal
    import threading
    if torchrun_worker or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.command == "eval":
            from .evaluation.cli import main as eval_main
            from .evaluation.distributed import launched
            with _signals(torchrun_worker=launched()):
                return eval_main(args)
        with _signals(), _silenced(args.quiet):
            report = run(args)
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        left = "rerun the same command to resume" if args.command == "eval" else "nothing was written to --out"
        print(f"renoise {args.command}: {stopped}; {left}", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
    except BAD_INPUT as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"renoise {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        kept = "rerun the same command to resume" if args.command == "eval" else "--out is as it was"
        print(f"renoise {args.command}: error: {' '.join(str(e).split())}; {kept}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
