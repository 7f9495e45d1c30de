"""The demo model's architecture, tokenizer files and diffusers folder layout.

A Stable Diffusion 1.x-shaped latent diffusion model for the 128 px scenes of `scenes`:

    AutoencoderKL   f = 8, 4 latent channels, blocks (16, 32, 64, 64)    128 px ↔ 4×16×16 latents
    CLIP text model 3 layers, width 128, 4 heads, 77 positions          caption → [77, 128]
    UNet            blocks (32, 64, 128), cross-attention on the first two levels
    schedule        SD's scaled-linear betas (0.00085 → 0.012), ε-prediction, DDIM config

`write_folder(folder, unet, vae, text_encoder)` saves the diffusers pipeline layout (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) with fp16 safetensors, so that both
`renoise.models.load_pipeline` and diffusers' `StableDiffusionPipeline.from_pretrained` read it.
The tokenizer is CLIP's byte-level BPE with merges learned on the captions' words (every word one
token), written both as vocab.json + merges.txt and as tokenizer.json.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..models.clip import CLIPTextConfig
from ..models.configs import UNetConfig, VAEConfig
from ..models.tokenizer import bytes_to_unicode
from .scenes import COLOURS, POSITIONS, SHAPES, SIZES

__all__ = ["UNET", "VAE", "text_config", "SCHEDULER", "WORDS", "learn_merges", "vocabulary", "write_tokenizer",
           "write_folder", "unet_diffusers_config", "vae_diffusers_config", "text_diffusers_config"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = sorted({"a", "on", "the", "in", "and", "background", *COLOURS, *SHAPES, *SIZES, *POSITIONS})

UNET = UNetConfig(
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=(1, 1, 1), num_heads=(2, 4, 4), transformer_layers_per_block=(1, 1, 1),
    cross_attention_dim=128, norm_num_groups=8, sample_size=16)
VAE = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=4, sample_size=128,
                scaling_factor=1.0)          # the trained VAE's own factor is set at save time
SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
}


# ---------------------------------------------------------------------------------------------
# tokenizer

def learn_merges(words) -> list[tuple[str, str]]:
    """Byte-level BPE merges learned on `words` (each counted once) until every word is one symbol.
    Applying them by rank, as CLIP's tokenizer does, turns each word back into a single token."""
    table = bytes_to_unicode()
    pieces = {w: [table[b] for b in w.encode()] for w in words}
    for w in pieces:
        pieces[w][-1] += "</w>"
    merges = []
    while True:
        pairs = Counter(p for seq in pieces.values() for p in zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))       # most frequent; ties broken by the pair
        merges.append(best)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges): the 256 byte symbols, their end-of-word forms, one token per merge,
    then <|startoftext|> and <|endoftext|> (the largest id, as in CLIP)."""
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(WORDS)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def text_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(vocabulary()[0]), hidden_size=128, intermediate_size=512,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=128)


def write_tokenizer(folder) -> Path:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary()
    merge_lines = [f"{a} {b}" for a, b in merges]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "clean_up_tokenization_spaces": False, **special}, indent=1))
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": True, "special": True} for t in (BOS, EOS)]
    pattern = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    fast = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, vocab[EOS]], "cls": [BOS, vocab[BOS]],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": EOS, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merge_lines},
    }
    (folder / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# diffusers / transformers config files

def unet_diffusers_config(c: UNetConfig = UNET) -> dict:
    return {"_class_name": "UNet2DConditionModel", "sample_size": c.sample_size, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "down_block_types": list(c.down_block_types),
            "up_block_types": list(c.up_block_types), "block_out_channels": list(c.block_out_channels),
            "layers_per_block": list(c.layers_per_block), "attention_head_dim": list(c.num_heads),
            "transformer_layers_per_block": list(c.transformer_layers_per_block),
            "cross_attention_dim": c.cross_attention_dim, "norm_num_groups": c.norm_num_groups,
            "norm_eps": c.norm_eps, "flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift,
            "downsample_padding": c.downsample_padding, "mid_block_scale_factor": c.mid_block_scale_factor,
            "use_linear_projection": c.use_linear_projection, "upcast_attention": c.upcast_attention,
            "act_fn": "silu", "center_input_sample": False}


def vae_diffusers_config(c: VAEConfig) -> dict:
    n = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
            "sample_size": c.sample_size, "scaling_factor": c.scaling_factor, "force_upcast": False,
            "act_fn": "silu", "mid_block_add_attention": c.mid_block_add_attention}


def text_diffusers_config(c: CLIPTextConfig) -> dict:
    vocab = vocabulary()[0]
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.projection_dim, "attention_dropout": 0.0,
            "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS],
            "torch_dtype": "float32"}


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _save(module, path: Path, config: dict, filename: str, dtype):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / filename), metadata={"format": "pt"})


def write_folder(folder, unet, vae, text_encoder, *, dtype=torch.float16, readme: str | None = None) -> Path:
    """Save the three networks, the tokenizer and the scheduler config as a diffusers pipeline folder.
    `vae.config.scaling_factor` is written as the VAE's factor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    _save(unet, folder / "unet", unet_diffusers_config(unet.config), "diffusion_pytorch_model.safetensors", dtype)
    _save(vae, folder / "vae", vae_diffusers_config(vae.config), "diffusion_pytorch_model.safetensors", dtype)
    _save(text_encoder, folder / "text_encoder", text_diffusers_config(text_encoder.config), "model.safetensors",
          dtype)
    write_tokenizer(folder / "tokenizer")
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder
