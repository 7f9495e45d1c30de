"""Everything a Stable Diffusion pipeline needs, loaded in one call.

    pipe = load_pipeline("stabilityai/sdxl-turbo", dtype=torch.float16, device="cuda")
    pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2
    pipe.scheduler_config, pipe.kind ("sd" | "sdxl"), pipe.force_zeros_for_empty_prompt

Sources: a diffusers pipeline folder, a hub id (only the files needed are fetched, or found in
the local cache when offline), or a single-file LDM/SGM checkpoint (see single_file.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .sd_pipeline import Pipeline

__all__ = ["Pipeline", "load_pipeline"]


_SMALL_FILES = ("model_index.json", "scheduler/scheduler_config.json")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} ({what}) is not valid JSON: {e}") from None


BUILTIN = ("demo", "demo-flow")        # names of the pipelines shipped inside the package


def builtin_folder(name: str) -> Path:
    """The folder of a pipeline shipped with renoise ("demo": the trained demo model; "demo-flow": the
    demo flow model, an SD3-layout rectified flow of the same scenes)."""
    from ..demo import FLOW_MODEL_DIR, MODEL_DIR

    if name not in BUILTIN:
        raise ValueError(f"unknown built-in pipeline {name!r}; built in: {BUILTIN}")
    folder, trainer = (FLOW_MODEL_DIR, "train_flow") if name == "demo-flow" else (MODEL_DIR, "train")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the {name} model's weights are missing from this installation ({folder}); "
                                "reinstall renoise with its package data, or train them with "
                                f"`python -m renoise.demo.{trainer} --out <folder>` and pass that folder")
    return folder


def _pipeline_root(source, hub: dict) -> Path:
    """The local folder with model_index.json and the scheduler config (hub ids: fetch just those)."""
    from .loading import hub_snapshot, is_hub_id

    if is_hub_id(source):
        return hub_snapshot(source, _SMALL_FILES, **hub)
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{source!r} is neither an existing path nor a hub id of the form 'org/name'")
    return root


def load_pipeline(source, *, dtype=torch.float32, device="cpu", variant: str | None = None,
                  allow_pickle: bool = False, config=None, tokenizer=None, **hub) -> Pipeline:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the scheduler config.

    `source`: "demo" (the trained demo model shipped with renoise; a local folder of that name is
    "./demo"), "demo-flow" (the demo flow model shipped with renoise, a FlowPipeline), a diffusers
    pipeline folder, a hub id, or a single-file `.safetensors` checkpoint
    (then `config` and `tokenizer` are passed to `load_single_file`; an SD3 / SD 3.5 single file or
    a Black Forest Labs FLUX.1 file gives a FlowPipeline, with `config` the diffusers folder or hub id
    of the matching model for its tokenizers and missing parts: see flow_single_file.py). `variant`: e.g. "fp16" for
    `*.fp16.safetensors`. `hub`: cache_dir, revision, local_files_only. An SD3 / FLUX.1 folder or hub
    id (model_index.json's StableDiffusion3Pipeline / FluxPipeline, or its transformer's class) gives
    a `models.flow_pipeline.FlowPipeline` (`kind` "sd3" | "flux").
    """
    from .clip import load_text_encoder
    from .loading import component_present, is_hub_id, load_unet, load_vae
    from .tokenizer import load_tokenizer

    if source == "demo-flow":                     # trained with this many zero T5 tokens (flow_model.py)
        from ..demo.flow_model import MAX_SEQUENCE_LENGTH
        pipe = load_pipeline(builtin_folder(source), dtype=dtype, device=device, variant=variant,
                             allow_pickle=allow_pickle, config=config, tokenizer=tokenizer, **hub)
        pipe.max_sequence_length = MAX_SEQUENCE_LENGTH
        return pipe
    if source in BUILTIN:
        source = builtin_folder(source)
    if not is_hub_id(source) and Path(source).is_file():
        from .flow_single_file import is_flow_single_file, load_flow_single_file
        if is_flow_single_file(source):           # SD3 / SD 3.5 / FLUX.1 (original layouts): a FlowPipeline
            return load_flow_single_file(source, config=config, tokenizer=tokenizer, dtype=dtype, device=device,
                                         variant=variant, **hub)
        from .single_file import load_single_file
        return load_single_file(source, config=config, tokenizer=tokenizer, dtype=dtype, device=device,
                                allow_pickle=allow_pickle)
    if config is not None or tokenizer is not None:
        raise ValueError(f"config= and tokenizer= apply to single-file checkpoints; {source} is a diffusers "
                         "folder or hub id, which carries its own configs and tokenizers")
    root = _pipeline_root(source, hub)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} has no model_index.json: not a diffusers pipeline folder. "
                                "Single components load with load_unet / load_vae / load_text_encoder")
    index = _read_json(root / "model_index.json", "pipeline index")
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise FileNotFoundError(f"{source} has no scheduler/scheduler_config.json")
    scheduler_config = _read_json(sched_path, "scheduler config")

    where = root if not is_hub_id(source) else source
    from .flow_pipeline import flow_family, load_flow_pipeline
    family = flow_family(index)                   # the one place that tells UNet and flow pipelines apart
    if family is not None:
        return load_flow_pipeline(where, index, scheduler_config, family, dtype=dtype, device=device,
                                  variant=variant, allow_pickle=allow_pickle, **hub)
    common = dict(dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle)
    unet = load_unet(where, **common, **hub)
    vae = load_vae(where, **common, **hub)
    text_encoder = load_text_encoder(where, **common, **hub)
    tok = load_tokenizer(where, "tokenizer", **hub)
    sdxl = component_present(index, "text_encoder_2") or unet.config.addition_embed_type == "text_time"
    text_encoder_2 = tok2 = None
    if sdxl:
        if not component_present(index, "text_encoder_2"):
            raise ValueError(f"{source}: an SDXL UNet (text_time conditioning) without text_encoder_2 "
                             "(e.g. the SDXL refiner) is not supported")
        text_encoder_2 = load_text_encoder(where, subfolder="text_encoder_2", **common, **hub)
        tok2 = load_tokenizer(where, "tokenizer_2", **hub)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                    tokenizer_2=tok2, scheduler_config=scheduler_config, kind="sdxl" if sdxl else "sd",
                    force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)))
