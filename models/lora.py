"""LoRA merging (LCM-LoRA and friends) into the UNet and the text encoders.

For a layer with weight W and a LoRA pair (down [r, in, k, k] or [r, in], up [out, r(, 1, 1)]):

    W ← W + scale · (alpha / r) · (up.flatten(1) @ down.flatten(1)).view(W.shape)

computed in fp32 and cast back to W's dtype; alpha defaults to r when the file has none.
Unmerging subtracts the same term.

Key formats understood (one file may mix components):
    diffusers / peft   unet.<module>.lora_A.weight, .lora_B.weight [, unet.<module>.alpha]
                       transformer.<module>... for the SD3 / Flux transformers; alpha also from the
                       safetensors metadata diffusers writes ("lora_adapter_metadata": lora_alpha)
                       (also lora.down/up, lora_linear_layer.down/up, lora_down/up, and the legacy
                       attention-processor names <block>.processor.to_q_lora.down.weight);
                       text_encoder. / text_encoder_2. for the encoders
    kohya              lora_unet_<module with _ for .>.lora_down.weight, .lora_up.weight, .alpha
                       with diffusers module names or the original SGM names (input_blocks_4_1_...);
                       lora_te_ (SD), lora_te1_ / lora_te2_ (SDXL) for the encoders

Names are matched against maps built from OUR modules (each Linear/Conv2d's name with "." → "_",
and its SGM name), never by guessing where underscores were dots.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_lora", "merge_lora", "parse_lora", "LoraError"]


class LoraError(ValueError):
    """A LoRA file that does not fit the model (unknown keys, missing halves, wrong shapes)."""


_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight"),
          ("lora.down.weight", "lora.up.weight"), ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"))
_PEFT_PREFIXES = {"unet.": "unet", "transformer.": "transformer", "text_encoder.": "text_encoder",
                  "text_encoder_2.": "text_encoder_2", "base_model.model.": None}   # None: the default component
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# legacy attention processors: <attn>.processor.to_out_lora.down.weight → <attn>.to_out.0
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def load_lora(source, *, weight_name: str | None = None, allow_pickle: bool = False, **hub) -> dict[str, torch.Tensor]:
    """Read a LoRA: a file (.safetensors; pickles only with allow_pickle), a folder holding one
    .safetensors file, or a hub id (`weight_name`, default diffusers' "pytorch_lora_weights.safetensors",
    fetched or found in the local cache). `hub`: cache_dir, revision, local_files_only."""
    from .loading import hub_snapshot, is_hub_id, load_state_dict

    if is_hub_id(source):
        name = weight_name or "pytorch_lora_weights.safetensors"
        path = hub_snapshot(source, [name], **hub) / name
        if not path.is_file():
            raise FileNotFoundError(f"hub repo {source!r} has no LoRA file {name!r}; pass weight_name=")
    else:
        path = Path(source)
        if path.is_dir():
            files = [path / weight_name] if weight_name else sorted(path.glob("*.safetensors"))
            if len(files) != 1 or not files[0].is_file():
                raise FileNotFoundError(f"{path} holds {len(files)} .safetensors files; pass the LoRA file itself "
                                        "or weight_name=")
            path = files[0]
        elif not path.exists():
            raise FileNotFoundError(f"LoRA {source!r} is neither a file, a folder, nor a hub id 'org/name'")
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    return _with_metadata_alphas(sd, path) if path.suffix == ".safetensors" else sd


def _with_metadata_alphas(sd: dict, path) -> dict:
    """Add `<prefix><module>.alpha` keys from diffusers' "lora_adapter_metadata" (PEFT's LoraConfig as
    JSON, keys "transformer.lora_alpha" etc., or unprefixed) for modules whose file has no alpha."""
    import json

    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return sd
    meta = json.loads(raw)
    out = dict(sd)
    for key in sd:
        if not key.endswith(("lora_A.weight", "lora_down.weight")):
            continue
        module = key.rsplit(".", 2)[0]
        prefix = next((p for p in _PEFT_PREFIXES if module.startswith(p)), "")
        alpha = meta.get(f"{prefix}lora_alpha", meta.get("lora_alpha"))
        pattern = meta.get(f"{prefix}alpha_pattern", meta.get("alpha_pattern"))
        if pattern:
            raise LoraError(f"{Path(path).name}: per-module alphas (alpha_pattern {pattern}) are not supported")
        if alpha is not None and f"{module}.alpha" not in sd:
            out[f"{module}.alpha"] = torch.tensor(float(alpha))
    return out


def parse_lora(state_dict: dict, default: str = "unet") -> dict[tuple[str, str], dict]:
    """Group LoRA keys by (component, raw module name): {"down", "up", "alpha"}.

    Keys without a component prefix belong to `default` ("unet", or "transformer" for SD3 / Flux).

    The raw name is what the file says (dotted for diffusers/peft keys, kohya's underscored name
    for kohya keys); `merge_lora` resolves it against the model.
    """
    groups: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in state_dict.items():
        comp, name, part = _split_key(key, default)
        if comp is None:
            unknown.append(key)
            continue
        groups.setdefault((comp, name), {})[part] = value
    if unknown:
        known = len(state_dict) - len(unknown)
        raise LoraError(f"{len(unknown)} of {len(state_dict)} LoRA keys are in no known format "
                        f"({'none' if not known else known} recognised), e.g. {sorted(unknown)[:6]}; expected "
                        "diffusers/peft (unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down.weight) keys")
    for (comp, name), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"LoRA for {comp} module {name!r} has only {sorted(parts)}; need both down and up")
    return groups


def _split_key(key: str, default: str = "unet"):
    """(component, raw module name, "down" | "up" | "alpha") or (None, None, None)."""
    for prefix, comp in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            name, _, suffix = rest.partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
            return (comp, "kohya:" + name, part) if part else (None, None, None)
    comp = None
    for prefix, c in _PEFT_PREFIXES.items():
        if key.startswith(prefix):
            comp, key = c, key[len(prefix):]
            break
    comp = comp or default
    m = _PROCESSOR.match(key)
    if m:
        return comp, f"{m.group(1)}.{'to_out.0' if m.group(2) == 'to_out' else m.group(2)}", m.group(3)
    if key.endswith(".alpha"):
        return comp, key[: -len(".alpha")], "alpha"
    for down, up in _PAIRS:
        for suffix, part in ((down, "down"), (up, "up")):
            if key.endswith("." + suffix):
                return comp, key[: -len(suffix) - 1], part
    return None, None, None


# ---------------------------------------------------------------------------------------------
# name maps from our modules

def _layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n}


def _name_map(component: str, module: nn.Module) -> dict[str, str]:
    """{name as a file may spell it: our module name}: dotted names, kohya underscored names, and
    for the UNet the underscored SGM names."""
    names = list(_layers(module))
    out = {}
    for n in names:
        out[n] = n
        out["kohya:" + n.replace(".", "_")] = n
    if component == "unet" and hasattr(module, "config") and hasattr(module.config, "down_block_types"):
        from .single_file import unet_to_ldm
        sgm = unet_to_ldm({f"{n}.weight": n for n in names if not n.startswith("time_embedding.cond_proj")},
                          module.config)
        for key, n in sgm.items():
            out.setdefault("kohya:" + key[: -len(".weight")].replace(".", "_"), n)
    else:  # text encoders: accept names without the `text_model.` wrapper (transformers ≥ 5 layout)
        for n in names:
            if n.startswith("text_model."):
                out.setdefault(n[len("text_model."):], n)
                out.setdefault("kohya:" + n[len("text_model."):].replace(".", "_"), n)
    return out


def _is_transformer(module) -> bool:
    from .flux import FluxTransformer
    from .mmdit import SD3Transformer
    return isinstance(module, (SD3Transformer, FluxTransformer))


def _targets(target) -> dict[str, nn.Module]:
    """{component: module} from a Pipeline, a dict, a UNet or a text encoder."""
    if isinstance(target, dict):
        return {k: v for k, v in target.items() if v is not None}
    if hasattr(target, "modules") and hasattr(target, "transformer") and callable(target.modules):
        return {"transformer": target.transformer}      # a FlowPipeline: SD3 / FLUX LoRA files target the transformer
    if hasattr(target, "modules") and hasattr(target, "unet") and callable(target.modules):
        return {k: v for k, v in target.modules().items() if k != "vae"}
    if isinstance(target, nn.Module):
        if _is_transformer(target):
            return {"transformer": target}
        is_text = hasattr(target, "text_model")
        return {"text_encoder" if is_text else "unet": target}
    raise TypeError(f"merge_lora target must be a Pipeline, a dict of modules, a UNet, a transformer or a text encoder; "
                    f"got {type(target).__name__}")


# ---------------------------------------------------------------------------------------------
# merging

def _delta(down: torch.Tensor, up: torch.Tensor, shape, where: str) -> torch.Tensor:
    """(up.flatten(1) @ down.flatten(1)) in fp32, shaped like the layer weight."""
    if down.shape[0] != up.shape[1] or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise LoraError(f"LoRA {where}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a "
                        "rank-r pair (down [r, in(, k, k)], up [out, r(, 1, 1)])")
    d = up.float().flatten(1) @ down.float().flatten(1)
    if d.numel() != torch.Size(shape).numel() or d.shape[0] != shape[0]:
        raise LoraError(f"LoRA {where}: the update is {tuple(d.shape)} but the layer weight is {tuple(shape)}")
    return d.view(shape)


def merge_lora(target, lora, scale: float = 1.0, *, unmerge: bool = False, inplace: bool = True,
               allow_pickle: bool = False):
    """Merge (or with `unmerge=True` subtract) a LoRA into `target`'s weights.

    target: a `Pipeline` (UNet and text encoders), a dict {"unet": ..., "text_encoder": ...,
    "text_encoder_2": ..., "transformer": ...}, or a single UNet / SD3 or Flux transformer / text
    encoder. lora: a state dict or a file path (keys without a component prefix go to the UNet, or
    to the transformer when the target has one and no UNet).
    Every LoRA key must land on a module of the target (else LoraError listing the misses).
    `inplace=False` leaves `target` untouched and returns a merged copy (of the same kind).
    Returns the merged target.
    """
    state_dict = load_lora(lora, allow_pickle=allow_pickle) if isinstance(lora, (str, Path)) else lora
    if not state_dict:
        raise LoraError("the LoRA state dict is empty")
    result = target if inplace else _copy(target)
    modules = _targets(result)
    groups = parse_lora(state_dict, "transformer" if "transformer" in modules and "unet" not in modules else "unet")

    maps = {comp: _name_map(comp, m) for comp, m in modules.items()}
    plan, missing = [], []
    for (comp, raw), parts in groups.items():
        if comp not in modules:
            missing.append(f"{comp}:{raw} (no {comp} in the target)")
            continue
        name = maps[comp].get(raw)
        if name is None:
            missing.append(f"{comp}:{raw.removeprefix('kohya:')}")
            continue
        plan.append((comp, name, parts))
    if missing:
        raise LoraError(f"{len(missing)} of {len(groups)} LoRA modules match no layer of the model, e.g. "
                        f"{sorted(missing)[:8]}; the LoRA was made for another architecture (or pass the "
                        "pipeline / the text encoders it also targets)")

    sign = -1.0 if unmerge else 1.0
    layers = {comp: _layers(m) for comp, m in modules.items()}
    updates = []
    for comp, name, parts in plan:   # check everything before touching any weight
        weight = layers[comp][name].weight
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        delta = _delta(down.to(weight.device), up.to(weight.device), weight.shape, f"{comp}.{name}")
        updates.append((weight, sign * scale * alpha / rank, delta))
    with torch.no_grad():
        for weight, factor, delta in updates:
            weight.copy_((weight.float() + factor * delta).to(weight.dtype))
    return result


def _copy(target):
    if isinstance(target, dict):
        return {k: copy.deepcopy(v) for k, v in target.items()}
    if isinstance(target, nn.Module):
        return copy.deepcopy(target)
    fresh = copy.copy(target)   # a Pipeline: new networks, shared tokenizers and configs
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        if getattr(fresh, name, None) is not None:
            setattr(fresh, name, copy.deepcopy(getattr(fresh, name)))
    return fresh
