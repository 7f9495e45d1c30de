"""Loading the flow-matching transformers (SD3 / SD 3.5 MMDiT, FLUX.1).

    load_sd3_transformer(source, dtype=..., device=..., variant=...)    → SD3Transformer
    load_flux_transformer(source, ...)                                   → FluxTransformer
    load_transformer(source, ...)     either, told apart by config.json's _class_name or by the keys

`source` is a diffusers pipeline folder (the model in `transformer/`), a model folder, a hub id
("org/name": only the transformer's config and the one weights file it reads, with its shards, are
fetched) or a single `.safetensors` file: Stability's SD3/3.5 checkpoints (`model.diffusion_model.*`
MMDiT keys, text encoders and VAE in the same file are not read), Black Forest Labs' original
FLUX.1 files, or a diffusers-layout file (with config=). Original files are converted by name:
fused qkv (and FLUX's single-block `linear1` = q, k, v, mlp) are split along dim 0, and the final
AdaLN (and SD3's last context AdaLN) halves swapped from (shift, scale) to diffusers' (scale, shift).

The model is built on the meta device and every tensor is read once, into its final dtype and device
(see loading.read_safetensors); a fused tensor is split into fresh tensors and then dropped, so the
peak is the weights' size plus one fused tensor.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .configs import read_config
from .flux import FluxConfig, FluxTransformer
from .loading import (CheckpointError, _download, check_keys, find_weights, is_hub_id, load_model,
                      read_safetensors, safetensors_header, weight_variants)
from .mmdit import SD3Config, SD3Transformer

FAMILIES = {"SD3Transformer2DModel": (SD3Transformer, SD3Config, "SD3 transformer"),
            "FluxTransformer2DModel": (FluxTransformer, FluxConfig, "Flux transformer")}
PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------- original key layouts

def _sd3_rules(n_layers: int):
    """(regex on the original name, diffusers names, op) for Stability's MMDiT layout."""
    last = n_layers - 1
    b = r"joint_blocks\.(\d+)\."
    t = "transformer_blocks.{0}."
    return [
        (r"pos_embed", ["pos_embed.pos_embed"], None),
        (r"x_embedder\.proj\.(weight|bias)", ["pos_embed.proj.{0}"], None),
        (r"t_embedder\.mlp\.0\.(weight|bias)", ["time_text_embed.timestep_embedder.linear_1.{0}"], None),
        (r"t_embedder\.mlp\.2\.(weight|bias)", ["time_text_embed.timestep_embedder.linear_2.{0}"], None),
        (r"y_embedder\.mlp\.0\.(weight|bias)", ["time_text_embed.text_embedder.linear_1.{0}"], None),
        (r"y_embedder\.mlp\.2\.(weight|bias)", ["time_text_embed.text_embedder.linear_2.{0}"], None),
        (r"context_embedder\.(weight|bias)", ["context_embedder.{0}"], None),
        (r"final_layer\.linear\.(weight|bias)", ["proj_out.{0}"], None),
        (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", ["norm_out.linear.{0}"], "swap"),
        (b + r"x_block\.attn\.qkv\.(weight|bias)", [t + f"attn.to_{x}.{{1}}" for x in "qkv"], "split"),
        (b + r"context_block\.attn\.qkv\.(weight|bias)", [t + f"attn.add_{x}_proj.{{1}}" for x in "qkv"], "split"),
        (b + r"x_block\.attn\.ln_(q|k)\.weight", [t + "attn.norm_{1}.weight"], None),
        (b + r"context_block\.attn\.ln_(q|k)\.weight", [t + "attn.norm_added_{1}.weight"], None),
        (b + r"x_block\.attn\.proj\.(weight|bias)", [t + "attn.to_out.0.{1}"], None),
        (b + r"context_block\.attn\.proj\.(weight|bias)", [t + "attn.to_add_out.{1}"], None),
        (b + r"x_block\.attn2\.qkv\.(weight|bias)", [t + f"attn2.to_{x}.{{1}}" for x in "qkv"], "split"),
        (b + r"x_block\.attn2\.ln_(q|k)\.weight", [t + "attn2.norm_{1}.weight"], None),
        (b + r"x_block\.attn2\.proj\.(weight|bias)", [t + "attn2.to_out.0.{1}"], None),
        (b + r"x_block\.adaLN_modulation\.1\.(weight|bias)", [t + "norm1.linear.{1}"], None),
        (rf"joint_blocks\.({last})\.context_block\.adaLN_modulation\.1\.(weight|bias)",
         [t + "norm1_context.linear.{1}"], "swap"),
        (b + r"context_block\.adaLN_modulation\.1\.(weight|bias)", [t + "norm1_context.linear.{1}"], None),
        (b + r"x_block\.mlp\.fc1\.(weight|bias)", [t + "ff.net.0.proj.{1}"], None),
        (b + r"x_block\.mlp\.fc2\.(weight|bias)", [t + "ff.net.2.{1}"], None),
        (b + r"context_block\.mlp\.fc1\.(weight|bias)", [t + "ff_context.net.0.proj.{1}"], None),
        (b + r"context_block\.mlp\.fc2\.(weight|bias)", [t + "ff_context.net.2.{1}"], None),
    ]


def _flux_rules(n_layers: int = 0):
    """(regex on the original name, diffusers names, op) for Black Forest Labs' FLUX.1 layout."""
    d, t = r"double_blocks\.(\d+)\.", "transformer_blocks.{0}."
    s, u = r"single_blocks\.(\d+)\.", "single_transformer_blocks.{0}."
    emb = "time_text_embed."
    rules = [
        (r"img_in\.(weight|bias)", ["x_embedder.{0}"], None),
        (r"txt_in\.(weight|bias)", ["context_embedder.{0}"], None),
        (r"final_layer\.linear\.(weight|bias)", ["proj_out.{0}"], None),
        (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", ["norm_out.linear.{0}"], "swap"),
        (d + r"img_mod\.lin\.(weight|bias)", [t + "norm1.linear.{1}"], None),
        (d + r"txt_mod\.lin\.(weight|bias)", [t + "norm1_context.linear.{1}"], None),
        (d + r"img_attn\.qkv\.(weight|bias)", [t + f"attn.to_{x}.{{1}}" for x in "qkv"], "split"),
        (d + r"txt_attn\.qkv\.(weight|bias)", [t + f"attn.add_{x}_proj.{{1}}" for x in "qkv"], "split"),
        (d + r"img_attn\.norm\.query_norm\.scale", [t + "attn.norm_q.weight"], None),
        (d + r"img_attn\.norm\.key_norm\.scale", [t + "attn.norm_k.weight"], None),
        (d + r"txt_attn\.norm\.query_norm\.scale", [t + "attn.norm_added_q.weight"], None),
        (d + r"txt_attn\.norm\.key_norm\.scale", [t + "attn.norm_added_k.weight"], None),
        (d + r"img_attn\.proj\.(weight|bias)", [t + "attn.to_out.0.{1}"], None),
        (d + r"txt_attn\.proj\.(weight|bias)", [t + "attn.to_add_out.{1}"], None),
        (d + r"img_mlp\.0\.(weight|bias)", [t + "ff.net.0.proj.{1}"], None),
        (d + r"img_mlp\.2\.(weight|bias)", [t + "ff.net.2.{1}"], None),
        (d + r"txt_mlp\.0\.(weight|bias)", [t + "ff_context.net.0.proj.{1}"], None),
        (d + r"txt_mlp\.2\.(weight|bias)", [t + "ff_context.net.2.{1}"], None),
        (s + r"modulation\.lin\.(weight|bias)", [u + "norm.linear.{1}"], None),
        (s + r"linear1\.(weight|bias)", [u + "attn.to_q.{1}", u + "attn.to_k.{1}", u + "attn.to_v.{1}",
                                           u + "proj_mlp.{1}"], "linear1"),
        (s + r"norm\.query_norm\.scale", [u + "attn.norm_q.weight"], None),
        (s + r"norm\.key_norm\.scale", [u + "attn.norm_k.weight"], None),
        (s + r"linear2\.(weight|bias)", [u + "proj_out.{1}"], None),
    ]
    for ours, theirs in (("timestep", "time"), ("text", "vector"), ("guidance", "guidance")):
        rules += [(rf"{theirs}_in\.in_layer\.(weight|bias)", [emb + ours + "_embedder.linear_1.{0}"], None),
                  (rf"{theirs}_in\.out_layer\.(weight|bias)", [emb + ours + "_embedder.linear_2.{0}"], None)]
    return rules


def _sizes(op, n: int):
    """Row counts of the parts a fused tensor of n rows splits into."""
    if op == "split":
        return [n // 3] * 3
    if op == "linear1":          # q, k, v (D each) and the MLP (4D): 7D rows
        return [n // 7] * 3 + [4 * n // 7]
    return [n]


def conversion_plan(shapes: dict, family: str) -> dict:
    """{original name: (diffusers names, op, their shapes)} for every key of an original checkpoint
    (`shapes`: name → shape, prefix already removed). Unknown keys: CheckpointError naming them."""
    n_layers = len({k.split(".")[1] for k in shapes if k.startswith("joint_blocks.")})
    rules = [(re.compile(p + "$"), names, op) for p, names, op in
             (_sd3_rules(n_layers) if family == "sd3" else _flux_rules())]
    plan, unknown = {}, []
    for key, shape in shapes.items():
        for rx, names, op in rules:
            m = rx.match(key)
            if m:
                out = [n.format(*m.groups()) for n in names]
                rows = _sizes(op, shape[0])
                plan[key] = (out, op, [(r, *shape[1:]) for r in rows])
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of this {family} checkpoint are not in the original layout, "
                              f"e.g. {sorted(unknown)[:8]}")
    return plan


def convert(tensors: dict, plan: dict) -> dict:
    """Apply `plan` to original tensors (consumed: each fused one is dropped once split)."""
    out = {}
    for key in list(tensors):
        names, op, _ = plan[key]
        w = tensors.pop(key)
        if op == "swap":
            shift, scale = w.chunk(2, dim=0)
            out[names[0]] = torch.cat([scale, shift], dim=0)
        elif op in ("split", "linear1"):
            for name, part in zip(names, w.split(_sizes(op, w.shape[0]), dim=0)):
                out[name] = part.clone()
        else:
            out[names[0]] = w
        del w
    return out


# ---------------------------------------------------------------- configs from the keys

def single_file_family(keys) -> str:
    """"sd3", "flux" (original layouts) or "diffusers-sd3" / "diffusers-flux", from the key names."""
    keys = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys}
    if "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        return "sd3"
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        return "flux"
    if "transformer_blocks.0.attn.to_q.weight" in keys:
        return "diffusers-sd3" if "pos_embed.proj.weight" in keys else "diffusers-flux"
    raise CheckpointError("this file holds neither an SD3/3.5 MMDiT (joint_blocks.*), a FLUX.1 transformer "
                          "(double_blocks.*) nor a diffusers transformer (transformer_blocks.*)")


def _count(shapes, prefix):
    return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})


def sd3_config_from_shapes(shapes: dict) -> SD3Config:
    """An SD3Config read off an original checkpoint's shapes (head size 64 unless q/k norms say otherwise)."""
    D, cin, p, _ = shapes["x_embedder.proj.weight"]
    ln = shapes.get("joint_blocks.0.x_block.attn.ln_k.weight")
    head = ln[0] if ln else 64
    n = _count(shapes, "joint_blocks.")
    return SD3Config(
        sample_size=128, patch_size=p, in_channels=cin, num_layers=n, attention_head_dim=head,
        num_attention_heads=D // head, joint_attention_dim=shapes["context_embedder.weight"][1],
        caption_projection_dim=D, pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
        out_channels=shapes["final_layer.linear.weight"][0] // (p * p),
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]),
        dual_attention_layers=tuple(i for i in range(n) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        qk_norm="rms_norm" if ln else None)


def flux_config_from_shapes(shapes: dict) -> FluxConfig:
    """A FluxConfig read off a BFL checkpoint's shapes (RoPE axes (16, 56, 56), i.e. head size 128)."""
    D, cin = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.key_norm.scale"][0]
    if head != 128:
        raise CheckpointError(f"head size {head}: the RoPE axes are known only for FLUX.1's 128 (16, 56, 56); "
                              "pass config= with axes_dims_rope")
    out = shapes["final_layer.linear.weight"][0]
    return FluxConfig(in_channels=cin, out_channels=None if out == cin else out,
                      num_layers=_count(shapes, "double_blocks."), num_single_layers=_count(shapes, "single_blocks."),
                      attention_head_dim=head, num_attention_heads=D // head,
                      joint_attention_dim=shapes["txt_in.weight"][1],
                      pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
                      guidance_embeds="guidance_in.in_layer.weight" in shapes)


# ---------------------------------------------------------------- loaders

def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")


def _as_config(config, cls):
    if config is None or isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise TypeError(f"config must be None, a dict or a {cls.__name__}; got {type(config).__name__}")


def load_single_file_transformer(path, *, dtype=torch.float32, device="cpu", config=None, family=None):
    """A transformer from one `.safetensors` file (SD3/3.5 single file, BFL FLUX.1, or a diffusers-layout
    file with config=). `family` ("sd3" | "flux") only checks what the file holds."""
    _check_dtype(dtype)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: single-file transformers are read from .safetensors only")
    header = safetensors_header(path)
    kind = single_file_family(header)
    if family is not None and not kind.endswith(family):
        raise CheckpointError(f"{path.name} holds a {kind} transformer, not {family}")
    if kind.startswith("diffusers-"):
        cls, cfg_cls = (SD3Transformer, SD3Config) if kind == "diffusers-sd3" else (FluxTransformer, FluxConfig)
        cfg = _as_config(config, cfg_cls)
        if cfg is None:
            raise ValueError(f"{path.name} is a diffusers-layout weights file; pass config= (a dict, a "
                             f"{cfg_cls.__name__}, or a config.json's contents)")
        with torch.device("meta"):
            model = cls(cfg)
        return load_model(model, path, dtype=dtype, device=device, what=cfg_cls.__name__)
    # original layouts: only the transformer's keys (an SD3 file also holds text encoders and the VAE)
    strip = any(k.startswith(PREFIX) for k in header)
    names = {k: k[len(PREFIX):] for k in header if k.startswith(PREFIX)} if strip else {k: k for k in header}
    shapes = {new: tuple(header[old]["shape"]) for old, new in names.items()}
    if kind == "sd3":
        cls, cfg = SD3Transformer, _as_config(config, SD3Config) or sd3_config_from_shapes(shapes)
    else:
        cls, cfg = FluxTransformer, _as_config(config, FluxConfig) or flux_config_from_shapes(shapes)
    plan = conversion_plan(shapes, kind)
    with torch.device("meta"):
        model = cls(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {n: s for names_, _, ss in plan.values() for n, s in zip(names_, ss)}
    check_keys(expected, converted, path, f"{cls.__name__} ({kind} single file)")
    rebuilt = {old for old, new in names.items() if plan[new][1] is not None}     # split or swapped
    tensors = read_safetensors(path, dtype=dtype, device=device, keys=list(names), rename=names.get, fresh=rebuilt)
    model.load_state_dict(convert(tensors, plan), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _folder(source, subfolder, *, variant, dtype, cache_dir, revision, local_files_only) -> Path:
    """The folder holding the transformer's config.json (a pipeline's `subfolder`, or the model folder)."""
    if is_hub_id(source):
        source = _download(source, subfolder, variants=weight_variants(variant, dtype), allow_pickle=False,
                           base="diffusion_pytorch_model", cache_dir=cache_dir, revision=revision,
                           local_files_only=local_files_only)
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{source!r} is neither an existing path nor a hub id of the form 'org/name'")
    for folder in ([root / subfolder] if subfolder else []) + [root]:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no transformer in {root}: expected {root / (subfolder or '')}/config.json "
                            "as in a diffusers pipeline folder")


def load_transformer(source, *, dtype=torch.float32, device="cpu", variant=None, subfolder="transformer",
                     config=None, family=None, cache_dir=None, revision=None, local_files_only=None):
    """An SD3Transformer or FluxTransformer from a diffusers folder, a hub id or a single file.

    dtype/device: where the weights end up (read once, no fp32 copy of half weights). variant:
    "fp16" / "bf16" weight files (with a half dtype and no variant, "fp16" files are used when present).
    config: overrides the folder's config.json, or gives a single file's architecture.
    """
    _check_dtype(dtype)
    if not is_hub_id(source) and Path(source).is_file():
        return load_single_file_transformer(source, dtype=dtype, device=device, config=config, family=family)
    folder = _folder(source, subfolder, variant=variant, dtype=dtype, cache_dir=cache_dir, revision=revision,
                     local_files_only=local_files_only)
    raw = read_config(folder / "config.json")
    name = raw.get("_class_name")
    if name not in FAMILIES:
        raise CheckpointError(f"{folder / 'config.json'} describes a {name!r}; renoise loads transformers of "
                              f"the classes {sorted(FAMILIES)}")
    cls, cfg_cls, what = FAMILIES[name]
    if family is not None and cls is not (SD3Transformer if family == "sd3" else FluxTransformer):
        raise CheckpointError(f"{folder} holds a {what}, not a {family} transformer")
    cfg = _as_config(config, cfg_cls) or cfg_cls.from_dict(raw)
    weights = find_weights(folder, variant=variant, dtype=dtype)
    with torch.device("meta"):
        model = cls(cfg)
    return load_model(model, weights, dtype=dtype, device=device, what=what)


def load_sd3_transformer(source, **kw) -> SD3Transformer:
    """`load_transformer` that insists on an SD3 / SD 3.5 MMDiT."""
    return load_transformer(source, family="sd3", **kw)


def load_flux_transformer(source, **kw) -> FluxTransformer:
    """`load_transformer` that insists on a FLUX.1 transformer."""
    return load_transformer(source, family="flux", **kw)
