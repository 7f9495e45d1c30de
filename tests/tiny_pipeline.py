"""Tiny random-weight SD-like and SDXL-like pipelines saved in the full diffusers folder layout.

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, [text_encoder_2/, tokenizer_2/],
    scheduler/scheduler_config.json

written with diffusers/transformers `save_pretrained` (safetensors), so that the very same folder
loads both through renoise.models and through diffusers (the oracle). The tokenizers use a tiny
CLIP-style byte-level BPE vocabulary built here (vocab.json + merges.txt): the 256 byte symbols,
their end-of-word forms, a few merges for the words the tests use, then the two special tokens
(so that <|endoftext|> has the largest id, as in CLIP, and pooling at argmax(ids) finds it).
The VAE downsamples by 8, as the real ones do; images of 32×32 px give 4×4 latents.
"""
import json
from pathlib import Path

import torch

WORDS_MERGES = ["c a", "ca t</w>", "t i", "g e", "ti ge", "tige r</w>", "p h", "o t", "ph ot", "phot o</w>",
                "d o", "do g</w>"]
TEXT_HIDDEN, TEXT_HIDDEN_2, PROJECTION_2, TIME_EMBED = 32, 32, 24, 8


def _byte_symbols():
    """CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def vocabulary():
    """(vocab dict token -> id, merges list) of the tiny BPE."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in WORDS_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, list(WORDS_MERGES)


def save_tokenizer(folder, pad_token="<|endoftext|>"):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))
    return folder


def _tokenizer(folder):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_encoder(hidden, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocabulary()[0]), hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="gelu" if projection else "quick_gelu", projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(cross_dim, sdxl, seed):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                     projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION_2,
                     use_linear_projection=True, transformer_layers_per_block=(1, 2))
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4), norm_num_groups=16, **extra).eval()


def _vae(scaling_factor, seed):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    blocks = 4
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         scaling_factor=scaling_factor).eval()


SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1)


def save_sd(folder, seed=0, scheduler="ddim"):
    """An SD 1.x-like pipeline (one CLIP encoder, DDIM scheduler as in SD 2.1) at `folder`."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    folder = Path(folder)
    tok = _tokenizer(save_tokenizer(folder / "_tok"))
    sched = (DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCALED_LINEAR) if scheduler == "ddim"
             else EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SCALED_LINEAR))
    pipe = StableDiffusionPipeline(vae=_vae(0.18215, seed + 1), text_encoder=_text_encoder(TEXT_HIDDEN, seed=seed + 2),
                                   tokenizer=tok, unet=_unet(TEXT_HIDDEN, False, seed + 3), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _replace_tokenizer(folder / "tokenizer", folder / "_tok")
    return folder


def save_sdxl(folder, seed=0):
    """An SDXL-Turbo-like pipeline (two encoders, pooled embeds, time ids, Euler-ancestral trailing)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    folder = Path(folder)
    tok = _tokenizer(save_tokenizer(folder / "_tok"))
    tok2 = _tokenizer(save_tokenizer(folder / "_tok2", pad_token="!"))
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025, seed + 1), text_encoder=_text_encoder(TEXT_HIDDEN, seed=seed + 2),
        text_encoder_2=_text_encoder(TEXT_HIDDEN_2, PROJECTION_2, seed=seed + 3), tokenizer=tok, tokenizer_2=tok2,
        unet=_unet(TEXT_HIDDEN + TEXT_HIDDEN_2, True, seed + 4),
        scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SCALED_LINEAR),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _replace_tokenizer(folder / "tokenizer", folder / "_tok")
    _replace_tokenizer(folder / "tokenizer_2", folder / "_tok2")
    return folder


def _replace_tokenizer(target, source):
    """Keep the hand-written vocab.json/merges.txt layout of real SD repositories."""
    import shutil
    shutil.rmtree(target)
    source.rename(target)
