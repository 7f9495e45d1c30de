"""SD3 / SD 3.5 and FLUX.1 single files as whole pipelines (`load_pipeline(file, config=...)`).

Stability's all-in-one SD3 files hold every network under one prefix each (FACTS-FLOW.md §3.2;
diffusers' single_file_utils.py):

    model.diffusion_model.*                  the MMDiT (original layout, see transformer_loading.py)
    first_stage_model.*  (or vae.*)          the 16-channel VAE, LDM layout (single_file.convert_vae)
    text_encoders.clip_l.transformer.*       CLIP-L, transformers names
    text_encoders.clip_g.transformer.*       CLIP-G (OpenCLIP bigG), transformers names, with text_projection
    text_encoders.t5xxl.transformer.*        T5 v1.1 XXL encoder, transformers names (absent in *_incl_clips files)

Other files hold less: the MMDiT and VAE without text encoders (`sd3_medium.safetensors`), or the
transformer alone (Black Forest Labs' `flux1-dev.safetensors`, bare or under `model.diffusion_model.`).

No file holds tokenizers, and many lack text encoders or the VAE: what is missing comes from
a *reference*, the diffusers folder or hub id of the matching model (`config=`, CLI `--config`;
`tokenizer=` for the tokenizers alone). Its component configs (transformer/, vae/, text_encoder*/
config.json) and scheduler config are used when it has them; otherwise configs are read off the
weight shapes (VAE: 32 norm groups, SD3's / FLUX's scaling and shift factors; CLIP: head size 64).
Without a reference, the released model of the file's kind is used (e.g.
stabilityai/stable-diffusion-3-medium-diffusers), from the Hugging Face cache or the network.

Rules: a component in the file wins over the reference's. An all-in-one SD3 file without T5 gives
`text_encoder_3=None` (diffusers' zeros), as it was released to be used; a file with no text encoders
at all takes every one from the reference (T5 when its model_index.json lists one). SD3's CLIP-L
projection is the identity whatever the file holds: SD3 pools CLIP-L unprojected (Stability's
reference code), and diffusers' from_single_file sets `text_projection` to eye(768) too.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .loading import CheckpointError, is_hub_id, safetensors_header

__all__ = ["flow_file_family", "is_flow_single_file", "split_flow_file", "infer_vae_config", "infer_t5_config",
           "released_model", "load_flow_single_file", "RELEASED_REPOS"]

TRANSFORMER = "model.diffusion_model."
PARTS = {"vae": ("first_stage_model.", "vae."), "clip_l": ("text_encoders.clip_l.transformer.",),
         "clip_g": ("text_encoders.clip_g.transformer.",), "t5": ("text_encoders.t5xxl.transformer.",)}
# pipeline slot -> the file part that fills it
SLOTS = {"sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"},
         "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5"}}
TOKENIZERS = {"sd3": {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"},
              "flux": {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}}
# diffusers' default config repos for single files (single_file_utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS)
RELEASED_REPOS = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
                  "sd35-large": "stabilityai/stable-diffusion-3.5-large",
                  "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
                  "flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
# scheduler_config.json of the released models (FACTS-FLOW.md §1.8), used when the reference has none
SCHEDULERS = {
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096},
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False},
}
_CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json", "text_encoder_3/config.json")


# ---------------------------------------------------------------------------------------------
# what the file holds

def flow_file_family(keys) -> str | None:
    """"sd3" | "flux" for a file in the original SD3/3.5 or BFL FLUX.1 layout, "diffusers-sd3" /
    "diffusers-flux" for a diffusers-layout transformer file, None for anything else."""
    from .transformer_loading import single_file_family
    try:
        return single_file_family(keys)
    except CheckpointError:
        return None


def is_flow_single_file(path) -> bool:
    """Whether `path` is a .safetensors file whose keys are an SD3/3.5 or FLUX.1 transformer's
    (original or diffusers layout); reads the header only."""
    path = Path(path)
    return path.suffix == ".safetensors" and flow_file_family(safetensors_header(path)) is not None


def split_flow_file(keys) -> dict[str, dict[str, str]]:
    """{"transformer", "vae", "clip_l", "clip_g", "t5"} → {name in the file: name without its prefix}.

    A file without `model.diffusion_model.` keys is a bare transformer file: every key is the
    transformer's. Otherwise a key under none of the known prefixes is a CheckpointError naming it."""
    keys = list(keys)
    if not any(k.startswith(TRANSFORMER) for k in keys):
        return {"transformer": {k: k for k in keys}} | {p: {} for p in PARTS}
    out = {"transformer": {}} | {p: {} for p in PARTS}
    unknown = []
    for key in keys:
        if key.startswith(TRANSFORMER):
            out["transformer"][key] = key[len(TRANSFORMER):]
            continue
        for part, prefixes in PARTS.items():
            hit = next((p for p in prefixes if key.startswith(p)), None)
            if hit:
                out[part][key] = key[len(hit):]
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of this single file are under no known prefix "
                              f"({TRANSFORMER}, {', '.join(p for ps in PARTS.values() for p in ps)}), "
                              f"e.g. {sorted(unknown)[:6]}")
    return out


def released_model(family: str, shapes: dict) -> str:
    """Which released model a transformer's (prefix-free) key shapes look like: "sd3-medium",
    "sd35-large" (38 joint blocks; also large-turbo), "sd35-medium" (dual attention), "flux-dev"
    (guidance embedding) or "flux-schnell"."""
    if family == "flux":
        return "flux-dev" if any(k.startswith("guidance_in.") for k in shapes) else "flux-schnell"
    if any(".x_block.attn2." in k for k in shapes):
        return "sd35-medium"
    if "joint_blocks.37.x_block.mlp.fc1.weight" in shapes:
        return "sd35-large"
    return "sd3-medium"


# ---------------------------------------------------------------------------------------------
# configs read off the shapes

def infer_vae_config(ldm_shapes: dict, base):
    """A VAEConfig from LDM VAE key shapes (prefix removed); the fields the shapes cannot tell
    (norm groups, scaling / shift factors, sample size, force_upcast) come from `base`."""
    down = sorted({int(k.split(".")[2]) for k in ldm_shapes if k.startswith("encoder.down.")})
    if not down or "decoder.conv_in.weight" not in ldm_shapes:
        raise CheckpointError("the VAE weights lack encoder.down.* or decoder.conv_in: not an LDM VAE")
    blocks = sorted({int(k.split(".")[4]) for k in ldm_shapes if k.startswith("encoder.down.0.block.")})
    return dataclasses.replace(
        base,
        block_out_channels=tuple(ldm_shapes[f"encoder.down.{i}.block.{blocks[-1]}.conv2.weight"][0] for i in down),
        layers_per_block=len(blocks), in_channels=ldm_shapes["encoder.conv_in.weight"][1],
        out_channels=ldm_shapes["decoder.conv_out.weight"][0], latent_channels=ldm_shapes["decoder.conv_in.weight"][1],
        use_quant_conv="quant_conv.weight" in ldm_shapes, use_post_quant_conv="post_quant_conv.weight" in ldm_shapes,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm_shapes)


def infer_t5_config(shapes: dict):
    """A T5Config from transformers T5 encoder key shapes (gated-GELU v1.1 feed-forward; the
    relative-attention max distance, 128, is not in the weights)."""
    from .t5 import T5Config
    emb = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if emb is None or bias is None or "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shapes:
        raise CheckpointError("the T5 weights lack shared.weight, the relative attention bias or the gated "
                              "feed-forward (wi_0): not a T5 v1.1 encoder")
    heads = bias[1]
    return T5Config(vocab_size=emb[0], d_model=emb[1], num_heads=heads, relative_attention_num_buckets=bias[0],
                    d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                    d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                    num_layers=len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}))


# ---------------------------------------------------------------------------------------------
# the reference (a diffusers folder or hub id of the matching model)

def _reference_root(ref, hub: dict) -> Path:
    """The local folder holding the reference's small config files (a hub id: just those fetched)."""
    from .loading import hub_snapshot
    if is_hub_id(ref):
        return hub_snapshot(ref, _CONFIG_FILES, **hub)
    root = Path(ref)
    if not root.is_dir():
        raise FileNotFoundError(f"{ref} is neither a diffusers folder nor a hub id of the form 'org/name'")
    return root


def _read_configs(root: Path) -> dict:
    """{"transformer", "vae", "text_encoder", ..., "scheduler", "model_index"} → the dicts present."""
    names = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}
    names |= {c: f"{c}/config.json" for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    out = {}
    for name, rel in names.items():
        if (root / rel).is_file():
            try:
                out[name] = json.loads((root / rel).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{root / rel} is not valid JSON: {e}") from None
    return out


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


# ---------------------------------------------------------------------------------------------
# components from the file

def _meta(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _vae_from_file(path, names, shapes, raw_config, family, *, dtype, device, check_only=False):
    from .configs import VAEConfig, vae_config
    from .loading import check_keys, model_from_state_dict, read_safetensors
    from .single_file import convert_vae
    from .vae import AutoencoderKL

    cfg = VAEConfig.from_dict(raw_config) if raw_config else infer_vae_config(shapes, vae_config(family))
    where = f"{Path(path).name} (first_stage_model.*)"
    if check_only:
        with torch.device("meta"):
            model = AutoencoderKL(cfg)
        check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
                   {k: tuple(v.shape) for k, v in convert_vae(_meta(shapes), cfg).items()}, where, "VAE")
        return cfg
    sd = convert_vae(read_safetensors(path, dtype=dtype, device=device, keys=list(names), rename=names.get), cfg)
    return model_from_state_dict(AutoencoderKL, cfg, sd, dtype=dtype, device=device, where=where, what="VAE")


def _clip_config(part, shapes, raw_config, family):
    from .clip import CLIPTextConfig, normalize_text_encoder_keys
    from .single_file import infer_clip_config

    projection = family == "sd3"
    sd = normalize_text_encoder_keys(_meta(shapes))
    if part == "clip_l":
        sd.pop("text_projection.weight", None)           # SD3: identity (see the module docstring); FLUX: none
        if projection:
            width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
            sd["text_projection.weight"] = torch.empty(width, width, device="meta")
    if raw_config:
        cfg = CLIPTextConfig.from_dict(raw_config)
        if cfg.with_projection != projection:
            have, want = ("CLIPTextModel" + ("WithProjection" if p else "") for p in (cfg.with_projection, projection))
            raise ValueError(f"the reference's {part} config is a {have}; {family} needs a {want}")
    else:
        cfg = infer_clip_config(sd, hidden_act="quick_gelu" if part == "clip_l" else "gelu", with_projection=projection)
    return cfg, sd


def _clip_from_file(path, part, names, shapes, raw_config, family, *, dtype, device, check_only=False):
    from .clip import check_text_encoder_keys, normalize_text_encoder_keys, text_encoder_from_state_dict
    from .loading import read_safetensors

    cfg, meta = _clip_config(part, shapes, raw_config, family)
    if check_only:
        check_text_encoder_keys(cfg, {k: tuple(v.shape) for k, v in meta.items()},
                                f"{Path(path).name} ({PARTS[part][0]}*)")
        return cfg
    names = {k: v for k, v in names.items() if not (part == "clip_l" and v == "text_projection.weight")}
    sd = normalize_text_encoder_keys(read_safetensors(path, dtype=dtype, device=device, keys=list(names),
                                                      rename=names.get))
    if part == "clip_l" and family == "sd3":
        sd["text_projection.weight"] = torch.eye(cfg.hidden_size, dtype=dtype, device=device)
    return text_encoder_from_state_dict(cfg, sd, dtype=dtype, device=device)


def _t5_from_file(path, names, shapes, raw_config, *, dtype, device, check_only=False):
    from .loading import check_keys, read_safetensors
    from .t5 import KEEP_FP32, T5Config, T5EncoderModel, _normalize, t5_encoder_from_state_dict

    cfg = T5Config.from_dict(raw_config) if raw_config else infer_t5_config(shapes)
    if check_only:
        with torch.device("meta"):
            model = T5EncoderModel(cfg)
        check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, _normalize(shapes),
                   f"{Path(path).name} ({PARTS['t5'][0]}*)", "T5 encoder")
        return cfg
    half = dtype in (torch.float16, torch.bfloat16)
    fp32 = [k for k, v in names.items() if half and v.rsplit(".", 2)[-2] in KEEP_FP32]   # `wo` stays fp32
    sd = read_safetensors(path, dtype=dtype, device=device, keys=[k for k in names if k not in fp32], rename=names.get)
    if fp32:
        sd |= read_safetensors(path, dtype=torch.float32, device=device, keys=fp32, rename=names.get)
    return t5_encoder_from_state_dict(cfg, sd, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# the pipeline

def load_flow_single_file(path, *, config=None, tokenizer=None, dtype=torch.float32, device="cpu",
                          variant: str | None = None, **hub):
    """A `FlowPipeline` from an SD3/3.5 single file (all-in-one or transformer-only) or a BFL FLUX.1 file.

    `config`: the diffusers folder or hub id of the matching model (the reference): tokenizers,
    component configs, scheduler config, and every component the file lacks. `tokenizer`: another
    folder / hub id for the tokenizers alone. Neither given: the released model of the file's kind
    (`RELEASED_REPOS`). `variant` and `hub` (cache_dir, revision, local_files_only) apply to what is
    read from a reference hub id.
    """
    from .clip import load_text_encoder
    from .flow_pipeline import FlowPipeline, load_t5_tokenizer
    from .loading import load_vae
    from .t5 import load_t5_encoder
    from .tokenizer import load_tokenizer
    from .transformer_loading import load_single_file_transformer

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: SD3 / FLUX.1 single files are read from .safetensors only")
    header = safetensors_header(path)
    kind = flow_file_family(header)
    if kind is None:
        raise CheckpointError(f"{path.name} holds neither an SD3/3.5 MMDiT (joint_blocks.*) nor a FLUX.1 "
                              "transformer (double_blocks.*)")
    if kind.startswith("diffusers-"):
        raise CheckpointError(f"{path.name} is a diffusers-layout transformer weights file, not a single-file "
                              "checkpoint: load the pipeline from its diffusers folder, or the transformer alone "
                              "with load_transformer(file, config=...)")
    family = kind
    parts = split_flow_file(header)
    shapes = {p: {new: tuple(header[old]["shape"]) for old, new in names.items()} for p, names in parts.items()}
    model = released_model(family, shapes["transformer"])
    slots = SLOTS[family]
    in_file = {p for p in ("vae", *slots.values()) if parts[p]}
    optional_t5 = family == "sd3" and bool({"clip_l", "clip_g"} & in_file)     # an *_incl_clips file: no T5
    needs = ["tokenizers"] + [p for p in ("vae", *slots.values())
                              if p not in in_file and not (p == "t5" and optional_t5)]

    ref = config if config is not None else tokenizer
    ref = ref if ref is not None else RELEASED_REPOS[model]
    what = f"{path.name} ({model}-like {'transformer only' if not in_file else 'single file'})"
    try:
        root = _reference_root(ref, hub)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{what} holds no {', '.join(needs)}; they come from config= (CLI: --config), a local diffusers folder "
            f"or hub id of the matching model, e.g. {RELEASED_REPOS[model]}. {ref} could not be read: {e}") from None
    raw = _read_configs(root)
    index = raw.get("model_index", {})
    # where each text encoder comes from: the file, the reference, or nowhere (SD3's T5: zeros)
    source = {}
    for slot, part in slots.items():
        if part in in_file:
            source[slot] = "file"
        elif part == "t5" and family == "sd3" and (optional_t5 or not _listed(index, slot)):
            source[slot] = None                   # an *_incl_clips file, or a reference without T5
        else:
            source[slot] = "reference"

    # tokenizers and every check that reads only headers first: a bad file or reference fails before the big reads
    tok_src = tokenizer if tokenizer is not None else ref
    tokenizers = {slot: None for slot in slots}
    for slot, part in slots.items():
        if source[slot] is None:
            continue
        sub = TOKENIZERS[family][slot]
        try:
            tokenizers[slot] = (load_t5_tokenizer if part == "t5" else load_tokenizer)(tok_src, sub, **hub)
        except FileNotFoundError as e:
            arg = "tokenizer=" if tokenizer is not None else "config="
            raise FileNotFoundError(f"{what} carries no tokenizers; {sub}/ is read from {arg} {tok_src} "
                                    f"(CLI: --config), which gives none: {e}. Pass a diffusers folder or hub id of "
                                    f"the matching model, e.g. {RELEASED_REPOS[model]}") from None
    common = dict(dtype=dtype, device=device)

    def from_file(part, slot, check_only=False):
        args = (path, parts[part], shapes[part], raw.get(slot))
        if part == "vae":
            return _vae_from_file(*args, family, check_only=check_only, **common)
        if part == "t5":
            return _t5_from_file(*args, check_only=check_only, **common)
        return _clip_from_file(path, part, *args[1:], family, check_only=check_only, **common)

    for slot, part in [("vae", "vae"), *slots.items()]:
        if part in in_file:
            from_file(part, slot, check_only=True)

    transformer = load_single_file_transformer(path, config=raw.get("transformer"), family=family, **common)
    from_ref = dict(variant=variant, **common, **hub)

    def from_reference(name, load):
        try:
            return load()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what} holds no {name}, and the reference {ref} (config=) gives none: {e}. "
                                    f"Pass config= a diffusers folder or hub id of the matching model, e.g. "
                                    f"{RELEASED_REPOS[model]}") from None

    vae = from_file("vae", "vae") if "vae" in in_file else from_reference("VAE", lambda: load_vae(ref, **from_ref))
    encoders = {}
    for slot, part in slots.items():
        if source[slot] == "file":
            encoders[slot] = from_file(part, slot)
        elif source[slot] is None:
            encoders[slot] = None
        elif part == "t5":
            encoders[slot] = from_reference("T5 encoder", lambda s=slot: load_t5_encoder(ref, subfolder=s, **from_ref))
        else:
            encoders[slot] = from_reference(f"{part} text encoder",
                                            lambda s=slot: load_text_encoder(ref, subfolder=s, **from_ref))

    scheduler = raw.get("scheduler") or SCHEDULERS[model if family == "flux" else "sd3"]
    if family == "flux":
        return FlowPipeline(transformer, vae, encoders["text_encoder"], tokenizers["text_encoder"],
                            encoders["text_encoder_2"], tokenizers["text_encoder_2"],
                            scheduler_config=dict(scheduler), kind="flux")
    return FlowPipeline(transformer, vae, encoders["text_encoder"], tokenizers["text_encoder"],
                        encoders["text_encoder_2"], tokenizers["text_encoder_2"], encoders["text_encoder_3"],
                        tokenizers["text_encoder_3"], scheduler_config=dict(scheduler), kind="sd3")
