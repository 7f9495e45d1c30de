"""Single-file Stable Diffusion checkpoints in the original LDM (SD 1.x/2.x) and SGM (SDXL) layout.

A checkpoint holds every component under one prefix each:

    model.diffusion_model.*                 UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*  (or vae.*)         VAE  (encoder.down.{i}.block.{j}, mid.attn_1, ...)
    cond_stage_model.transformer.*          SD 1.x CLIP ViT-L (transformers names)
    cond_stage_model.model.*                SD 2.x OpenCLIP ViT-H (open_clip names)
    conditioner.embedders.0.transformer.*   SDXL CLIP ViT-L
    conditioner.embedders.1.model.*         SDXL OpenCLIP bigG

The conversions to our (= diffusers / transformers) names are pure dict → dict functions. The UNet
and VAE maps are generated from the config (which LDM block holds which diffusers module), so
the same table converts both ways; the architecture is sniffed from the key prefixes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .clip import CLIPTextConfig, normalize_text_encoder_keys

__all__ = ["sniff", "split_checkpoint", "unet_key_map", "vae_key_map", "convert_unet", "convert_vae",
           "convert_clip", "convert_open_clip", "unet_to_ldm", "vae_to_ldm", "open_clip_from_transformers",
           "load_single_file", "UnknownCheckpointError", "SCHEDULER_CONFIGS"]


class UnknownCheckpointError(ValueError):
    """The keys of a checkpoint match none of the known single-file layouts."""


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
PREFIXES = {
    "clip": "cond_stage_model.transformer.",          # SD 1.x
    "open_clip": "cond_stage_model.model.",           # SD 2.x
    "clip_xl": "conditioner.embedders.0.transformer.",
    "open_clip_xl": "conditioner.embedders.1.model.",
}

# Scheduler configs of the released models of each kind (FACTS.md §1d).
_COMMON = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
           "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
SCHEDULER_CONFIGS = {
    "sd1": {"_class_name": "PNDMScheduler", **_COMMON, "prediction_type": "epsilon", "skip_prk_steps": True},
    "sd2": {"_class_name": "DDIMScheduler", **_COMMON, "prediction_type": "v_prediction"},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_COMMON, "prediction_type": "epsilon",
             "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False},
}
# The architecture whose UNet / VAE configs a sniffed kind defaults to (names in configs.py).
_KNOWN_ARCH = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl-base"}


# ---------------------------------------------------------------------------------------------
# sniffing and splitting

def sniff(keys) -> str:
    """"sd1" | "sd2" | "sdxl" from the key prefixes of a checkpoint (or UnknownCheckpointError)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET_PREFIX + "joint_blocks.") or has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise UnknownCheckpointError("an SD3/3.5 or FLUX.1 single file, not an SD/SDXL one: load it with "
                                     "load_pipeline(file, config=<diffusers folder or hub id of the model>), "
                                     "which reads these from .safetensors")
    if has(PREFIXES["open_clip_xl"]):
        if not has(UNET_PREFIX):
            raise UnknownCheckpointError("an SDXL-style checkpoint without UNet weights "
                                         f"({UNET_PREFIX}*); cannot load it as a pipeline")
        return "sdxl"
    if has("conditioner.embedders."):
        raise UnknownCheckpointError("an SGM checkpoint whose embedders are not SDXL base's "
                                     "(CLIP-L at embedders.0, OpenCLIP-bigG at embedders.1), e.g. the refiner; "
                                     "not supported")
    if has(PREFIXES["open_clip"]):
        return "sd2"
    if has(PREFIXES["clip"]):
        return "sd1"
    if has(UNET_PREFIX):
        if has(UNET_PREFIX + "label_emb."):
            return "sdxl"
        raise UnknownCheckpointError("an LDM UNet without text encoders: load_single_file needs a whole "
                                     "SD/SDXL checkpoint (UNet, VAE, text encoders); for the UNet alone use "
                                     "convert_unet(split_checkpoint(ckpt, kind)['unet'], config)")
    sample = ", ".join(sorted(keys)[:6])
    raise UnknownCheckpointError("unknown checkpoint layout: no LDM/SGM prefixes (model.diffusion_model., "
                                 f"first_stage_model., cond_stage_model., conditioner.embedders.); first keys: "
                                 f"{sample}. Diffusers folders load with load_pipeline(folder)")


def split_checkpoint(state_dict: dict, kind: str) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder", ["text_encoder_2"]} → sub-dicts with their prefix removed."""
    te = {"sd1": ("clip",), "sd2": ("open_clip",), "sdxl": ("clip_xl", "open_clip_xl")}[kind]
    prefixes = {"unet": (UNET_PREFIX,), "vae": VAE_PREFIXES, "text_encoder": (PREFIXES[te[0]],)}
    if len(te) == 2:
        prefixes["text_encoder_2"] = (PREFIXES[te[1]],)
    parts = {name: {} for name in prefixes}
    for key, value in state_dict.items():
        for name, options in prefixes.items():
            hit = next((p for p in options if key.startswith(p)), None)
            if hit:
                parts[name][key[len(hit):]] = value
                break
    return parts


# ---------------------------------------------------------------------------------------------
# UNet

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_map(config) -> dict[str, tuple[str, bool]]:
    """{diffusers module path: (LDM module path, is_resnet)} for a UNetConfig."""
    m = {"conv_in": ("input_blocks.0.0", False), "time_embedding.linear_1": ("time_embed.0", False),
         "time_embedding.linear_2": ("time_embed.2", False), "conv_norm_out": ("out.0", False),
         "conv_out": ("out.2", False), "mid_block.resnets.0": ("middle_block.0", True),
         "mid_block.attentions.0": ("middle_block.1", False), "mid_block.resnets.1": ("middle_block.2", True)}
    if config.addition_embed_type == "text_time":
        m["add_embedding.linear_1"] = ("label_emb.0.0", False)
        m["add_embedding.linear_2"] = ("label_emb.0.2", False)
    n = len(config.block_out_channels)
    block = 1
    for i, kind in enumerate(config.down_block_types):
        for j in range(config.layers_per_block[i]):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{block}.0", True)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", False)
            block += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", False)
            block += 1
    block = 0
    for i, (kind, layers) in enumerate(zip(config.up_block_types, config.layers_per_block[::-1])):
        attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", True)
            if attention:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", False)
            if j == layers and i < n - 1:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{block}.{2 if attention else 1}.conv", False)
            block += 1
    return m


def _convert(state_dict: dict, table: dict[str, tuple[str, dict]], what: str) -> dict:
    """Rename keys by the longest matching module prefix of `table` (source path → (target path,
    inner renames)); any key that no prefix covers is an error naming it."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            src = ".".join(parts[:cut])
            if src in table:
                dst, inner = table[src]
                rest = ".".join(parts[cut:])
                head, _, param = rest.rpartition(".")
                rest = f"{inner.get(head, head)}.{param}" if head else rest
                out[f"{dst}.{rest}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} keys fit no module of the config, e.g. {sorted(unknown)[:6]}; "
                         "the checkpoint and the config describe different architectures")
    return out


def convert_unet(state_dict: dict, config) -> dict:
    """LDM UNet keys (prefix removed) → our/diffusers keys."""
    inv = {v: k for k, v in _RESNET.items()}
    return _convert(state_dict, {ldm: (ours, inv if res else {}) for ours, (ldm, res) in unet_key_map(config).items()},
                    "UNet")


def unet_to_ldm(state_dict: dict, config) -> dict:
    """Our/diffusers UNet keys → LDM keys (the inverse of convert_unet)."""
    return _convert(state_dict, {ours: (ldm, _RESNET if res else {}) for ours, (ldm, res) in unet_key_map(config).items()},
                    "UNet")


# ---------------------------------------------------------------------------------------------
# VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_map(config) -> dict[str, tuple[str, dict]]:
    """{diffusers module path: (LDM module path, inner renames)} for a VAEConfig."""
    n = len(config.block_out_channels)
    res = {"conv_shortcut": "nin_shortcut"}
    m = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = (f"{side}.conv_in", {})
        m[f"{side}.conv_out"] = (f"{side}.conv_out", {})
        m[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        m[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", res)
        m[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", res)
        m[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTN)
    for i in range(n):
        for j in range(config.layers_per_block):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", res)
        for j in range(config.layers_per_block + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", res)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return m


def convert_vae(state_dict: dict, config) -> dict:
    """LDM VAE keys (prefix removed) → ours; the 1×1 conv attention weights become Linear [C, C]."""
    table = {ldm: (ours, {v: k for k, v in inner.items()}) for ours, (ldm, inner) in vae_key_map(config).items()}
    out = _convert(state_dict, table, "VAE")
    for key, value in out.items():
        if ".mid_block.attentions.0." in key and key.endswith(".weight") and value.ndim == 4:
            out[key] = value[:, :, 0, 0]
    return out


def vae_to_ldm(state_dict: dict, config) -> dict:
    """Ours → LDM VAE keys, attention weights as 1×1 convs (the inverse of convert_vae)."""
    out = _convert(state_dict, vae_key_map(config), "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


# ---------------------------------------------------------------------------------------------
# text encoders

def convert_clip(state_dict: dict) -> dict:
    """SD 1.x / SDXL-first CLIP (transformers names behind the prefix) → ours."""
    return normalize_text_encoder_keys(state_dict)


_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def convert_open_clip(state_dict: dict, num_layers: int | None = None, with_projection: bool = False) -> dict:
    """open_clip text tower → transformers names.

    `in_proj_{weight,bias}` [3D(, D)] splits into q, k, v thirds; `text_projection` [D, P] is
    transposed into a bias-free Linear [P, D]. Layers ≥ `num_layers` are dropped (SD 2.x keeps 23
    of 24), and `text_projection` unless `with_projection`; `logit_scale` and `attn_mask` are unused.
    """
    out, unknown = {}, []
    tm = "text_model."
    for key, value in state_dict.items():
        if key in ("logit_scale", "attn_mask"):
            continue
        if key == "token_embedding.weight":
            out[tm + "embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[tm + "embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[tm + "final_layer_norm." + key.split(".", 1)[1]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            _, _, index, rest = key.split(".", 3)
            if num_layers is not None and int(index) >= num_layers:
                continue
            layer = f"{tm}encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}_proj.{rest.rsplit('_', 1)[1]}"] = part.contiguous()
                continue
            head, _, param = rest.rpartition(".")
            if head not in _OPEN_CLIP_LAYER:
                unknown.append(key)
                continue
            out[f"{layer}{_OPEN_CLIP_LAYER[head]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"OpenCLIP text encoder: unexpected keys {sorted(unknown)[:6]}")
    return out


def open_clip_from_transformers(state_dict: dict) -> dict:
    """Transformers/our CLIP names → open_clip's (the inverse of convert_open_clip, used to write
    test checkpoints)."""
    inv = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    sd = normalize_text_encoder_keys(state_dict)
    out, qkv = {}, {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            index, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            head, _, param = rest.rpartition(".")
            if head in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((index, param), {})[head[-6]] = value
            else:
                out[f"transformer.resblocks.{index}.{inv[head]}.{param}"] = value
    for (index, param), parts in qkv.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def infer_clip_config(state_dict: dict, *, hidden_act: str, with_projection: bool = False,
                      head_dim: int = 64) -> CLIPTextConfig:
    """A CLIPTextConfig read from the shapes of converted (transformers-named) weights; the head
    count assumes CLIP's head size of 64 (true for ViT-L, ViT-H and bigG)."""
    tok = state_dict["text_model.embeddings.token_embedding.weight"]
    if tok.shape[1] % head_dim:
        raise ValueError(f"cannot infer the head count of a {tok.shape[1]}-wide text encoder (not a multiple of "
                         f"{head_dim}); pass its config (config={{'text_encoder': ...}} or a diffusers folder)")
    layers = {int(k.split(".")[3]) for k in state_dict if k.startswith("text_model.encoder.layers.")}
    hidden = tok.shape[1]
    return CLIPTextConfig(
        vocab_size=tok.shape[0], hidden_size=hidden,
        intermediate_size=state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers), num_attention_heads=hidden // head_dim,
        max_position_embeddings=state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=hidden_act, with_projection=with_projection,
        projection_dim=state_dict["text_projection.weight"].shape[0] if with_projection else hidden)


# ---------------------------------------------------------------------------------------------
# loading

def _configs_from(config, kind: str) -> dict:
    """Component configs from `config`: None (the known architecture of `kind`), a diffusers folder,
    or a dict {component: config object or config.json dict}."""
    from .configs import UNetConfig, VAEConfig, unet_config, vae_config

    parsers = {"unet": UNetConfig.from_dict, "vae": VAEConfig.from_dict,
               "text_encoder": CLIPTextConfig.from_dict, "text_encoder_2": CLIPTextConfig.from_dict}
    out = {}
    if config is None:
        out = {"unet": unet_config(_KNOWN_ARCH[kind]), "vae": vae_config(_KNOWN_ARCH[kind])}
    elif isinstance(config, (str, Path)):
        import json
        folder = Path(config)
        if not folder.is_dir():
            raise FileNotFoundError(f"config folder {folder} does not exist")
        for name, parse in parsers.items():
            path = folder / name / "config.json"
            if path.is_file():
                out[name] = parse(json.loads(path.read_text()))
        for name in ("model_index.json", "scheduler/scheduler_config.json"):
            if (folder / name).is_file():
                out[name] = json.loads((folder / name).read_text())
    elif isinstance(config, dict):
        for name, value in config.items():
            if name not in parsers:
                raise ValueError(f"config: unknown component {name!r}; expected some of {sorted(parsers)}")
            out[name] = parsers[name](value) if isinstance(value, dict) else value
    else:
        raise TypeError(f"config must be None, a diffusers folder or a dict of component configs, got {type(config)}")
    for name in ("unet", "vae"):
        if name not in out:
            raise ValueError(f"config gives no {name} config; pass one or leave config=None for the "
                             f"known {kind} architecture")
    return out


# Hub repos whose tokenizer folders fit the released single-file checkpoints of each kind.
TOKENIZER_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def _tokenizers(source, kind: str):
    from .tokenizer import load_tokenizer

    source = source or TOKENIZER_REPOS[kind]
    try:
        first = load_tokenizer(source, "tokenizer")
        second = load_tokenizer(source, "tokenizer_2") if kind == "sdxl" else None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"a single-file checkpoint carries no tokenizer, and none was found in {source}: "
                                f"{e}. Pass tokenizer= (a diffusers folder or hub id with tokenizer/"
                                f"{' and tokenizer_2/' if kind == 'sdxl' else ''})") from None
    return first, second


def load_single_file(path, *, config=None, kind: str | None = None, tokenizer=None, dtype=torch.float32,
                     device="cpu", allow_pickle: bool = False, prediction_type: str | None = None):
    """Load an LDM/SGM single-file checkpoint into a `Pipeline`.

    `kind` ("sd1" | "sd2" | "sdxl") is sniffed from the keys unless given. `config`: None for the
    released architecture of that kind (SD 1.5, SD 2.1-768 with v-prediction, SDXL base), a diffusers
    folder whose component configs (and scheduler config, model_index.json, tokenizers) to use, or
    a dict {"unet": UNetConfig | dict, "vae": ..., "text_encoder": ..., "text_encoder_2": ...}.
    Text-encoder configs not given are read from the weight shapes. `tokenizer`: a diffusers folder
    or hub id holding tokenizer/ (and tokenizer_2/); default: the config folder, else the released
    model's hub repo (cache or network). `prediction_type` overrides the scheduler config's (SD 2.x
    512-base checkpoints are epsilon models; the file does not say).
    """
    from .loading import load_state_dict, model_from_state_dict
    from .sd_pipeline import Pipeline
    from .unet import UNet
    from .vae import AutoencoderKL
    from .clip import text_encoder_from_state_dict

    path = Path(path)
    ckpt = load_state_dict(path, allow_pickle=allow_pickle, dtype=dtype, device=device)  # straight to device
    kind = kind or sniff(ckpt)
    if kind not in SCHEDULER_CONFIGS:
        raise ValueError(f"kind must be one of {sorted(SCHEDULER_CONFIGS)}, got {kind!r}")
    configs = _configs_from(config, kind)
    parts = split_checkpoint(ckpt, kind)
    del ckpt
    for name, sub in parts.items():
        if not sub:
            raise UnknownCheckpointError(f"the {kind} checkpoint {path.name} has no {name} weights")

    unet = model_from_state_dict(UNet, configs["unet"], convert_unet(parts.pop("unet"), configs["unet"]),
                                  dtype=dtype, device=device, where=path, what="UNet")
    vae = model_from_state_dict(AutoencoderKL, configs["vae"], convert_vae(parts.pop("vae"), configs["vae"]),
                                 dtype=dtype, device=device, where=path, what="VAE")
    te_cfg, te2_cfg = configs.get("text_encoder"), configs.get("text_encoder_2")
    if kind == "sd2":   # OpenCLIP-H: the released encoder drops the last of its 24 layers
        layers = te_cfg.num_hidden_layers if te_cfg else _open_clip_layers(parts["text_encoder"]) - 1
        te_sd = convert_open_clip(parts["text_encoder"], num_layers=layers)
        te_cfg = te_cfg or infer_clip_config(te_sd, hidden_act="gelu")
    else:
        te_sd = convert_clip(parts["text_encoder"])
        te_cfg = te_cfg or infer_clip_config(te_sd, hidden_act="quick_gelu")
    text_encoder = text_encoder_from_state_dict(te_cfg, te_sd, dtype=dtype, device=device)
    text_encoder_2 = None
    if kind == "sdxl":
        te2_sd = convert_open_clip(parts["text_encoder_2"], with_projection=True,
                                   num_layers=te2_cfg.num_hidden_layers if te2_cfg else None)
        te2_cfg = te2_cfg or infer_clip_config(te2_sd, hidden_act="gelu", with_projection=True)
        text_encoder_2 = text_encoder_from_state_dict(te2_cfg, te2_sd, dtype=dtype, device=device)

    scheduler = dict(configs.get("scheduler/scheduler_config.json") or SCHEDULER_CONFIGS[kind])
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    index = configs.get("model_index.json") or {}
    folder = config if isinstance(config, (str, Path)) else None
    tok, tok2 = _tokenizers(tokenizer or folder, kind)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                    tokenizer_2=tok2, scheduler_config=scheduler, kind="sdxl" if kind == "sdxl" else "sd",
                    force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))


def _open_clip_layers(state_dict: dict) -> int:
    return len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
