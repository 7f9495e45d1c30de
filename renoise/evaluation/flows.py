"""`renoise eval` on flow-matching models (SD3 / SD 3.5 / FLUX.1): what the model is, read from its
configs before anything is loaded, and the checks that refuse what cannot run on a flow before
--out is touched.

    family = probe(args.model)     # FlowModel("flux", guidance_embeds=True), "unet", or None (unknown)
    check_methods(args, methods, family)       # ValueError naming what cannot run and what to do

A flow model runs with the flow Euler sampler and velocity outputs: the peers (renoise.peers, UNet
loops), noise correction (no fresh noise), the edit-enhancement regularizer (it acts on predicted
noise) and the editing modes (UNet cross-attention) do not apply. The flow-inversion anchors
(renoise.flow_anchors) run on flows only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FlowModel", "probe", "check_methods", "solver_of", "UNET"]

UNET = "unet"


@dataclass(frozen=True)
class FlowModel:
    """What presets.for_model reads off a flow pipeline: its kind ("sd3" | "flux") and whether its
    transformer takes the guidance scale as an input (FLUX.1-dev)."""
    kind: str
    guidance_embeds: bool = False


def probe(model: str):
    """FlowModel for a flow pipeline folder or single file, UNET for a UNet one (the built-in demo,
    a folder whose model_index.json names no flow pipeline, a non-flow single file), None when that
    cannot be told without loading (a hub id not on disk, an unreadable file): then the run's own
    checks after loading apply. Reads configs and safetensors headers only."""
    from ..models.pipeline import BUILTIN, builtin_folder
    try:
        path = Path(builtin_folder(model)) if model in BUILTIN else Path(model)
    except (ValueError, OSError):
        return None
    try:
        if path.is_file():
            return _probe_file(path)
        if (path / "model_index.json").is_file():
            return _probe_folder(path)
    except (ValueError, OSError, KeyError, TypeError):
        return None
    return None


def _probe_folder(root: Path):
    from ..models.flow_pipeline import flow_family
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    kind = flow_family(index)
    if kind is None:
        return UNET
    embeds = False
    if kind == "flux":
        config = root / "transformer" / "config.json"
        if not config.is_file():
            return None
        embeds = bool(json.loads(config.read_text(encoding="utf-8")).get("guidance_embeds", False))
    return FlowModel(kind, embeds)


def _probe_file(path: Path):
    from ..models.flow_single_file import flow_file_family
    from ..models.loading import safetensors_header
    if path.suffix != ".safetensors":
        return UNET
    keys = safetensors_header(path)
    family = flow_file_family(keys)
    if family is None:
        return UNET
    kind = family.removeprefix("diffusers-")
    embeds = kind == "flux" and any("guidance_in." in k or "guidance_embedder." in k for k in keys)
    return FlowModel(kind, embeds)


def solver_of(method, run_preset: str) -> str:
    """The solver a method runs ("fixed-point" or an anchor), without building its plan."""
    from ..presets import PRESETS
    from .methods import RUN_PRESET
    if method.peer is not None:
        return "fixed-point"
    if "solver" in method.overrides:
        return method.overrides["solver"]
    base = run_preset if method.base == RUN_PRESET else method.base
    return PRESETS[base].solver if base in PRESETS else "fixed-point"


def check_methods(args, method_list, family) -> None:
    """Refuse, before --out is touched, what cannot run on this model: on a flow the peers, editing
    modes, a non-flow sampler, noise correction and the regularizer (each method's plan is built
    here with the run's settings, as the run builds it); on a UNet model the flow-inversion anchors."""
    if family is None:
        return
    if family == UNET:
        from ..presets import FLOW_SAMPLERS, PRESETS
        flow_preset = args.preset in PRESETS and PRESETS[args.preset].sampler in FLOW_SAMPLERS
        if args.sampler in FLOW_SAMPLERS or flow_preset:
            given = f"--sampler {args.sampler}" if args.sampler in FLOW_SAMPLERS else f"--preset {args.preset}"
            raise ValueError(f"{args.model} is a UNet model; {given} is for flow-matching models (SD3 / SD 3.5 / "
                             "FLUX.1): pick a UNet preset or sampler (ddim, euler_ancestral, lcm)")
        anchors = [m.name for m in method_list if solver_of(m, args.preset or "sd15") != "fixed-point"]
        if anchors:
            raise ValueError(f"{args.model} is a UNet model; the flow-inversion anchors ({', '.join(anchors)}) run on "
                             "flow-matching models (SD3 / SD 3.5 / FLUX.1) only: drop them or pass a flow model")
        return
    what = f"{args.model} is a flow-matching model ({family.kind})"
    peers = [m.name for m in method_list if m.peer is not None]
    if peers:
        raise ValueError(f"{what}; the peers ({', '.join(peers)}) run UNet (epsilon) loops only: drop them, or "
                         "compare flows with --methods flow-anchors")
    if args.edit_control is not None or args.mask_edits:
        raise ValueError(f"{what}; editing modes (--edit-mode p2p, --self-inject, --local-blend, --mask-edits) work "
                         "on UNet cross-attention: flows take the plain prompt-swap edit (drop those flags)")
    if args.sampler is not None and args.sampler != "flow_euler":
        raise ValueError(f"{what}: it runs with the flow_euler sampler, not --sampler {args.sampler}")
    if args.noise_correction not in (None, "none"):
        raise ValueError(f"{what}; --noise-correction {args.noise_correction} corrects the fresh noise of stochastic "
                         "samplers and the flow Euler step adds none: drop it (or pass none)")
    from .methods import run_plans as _plans
    try:
        _plans(args, family, method_list)      # a method's plan that a flow refuses (regularizer, ...) raises here
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    except AttributeError:       # a preset rule that reads more of the pipeline: checked again once it is loaded
        pass
