"""Tiny random-weight SD-like and SDXL-like pipelines saved in the full diffusers folder layout.

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, [text_encoder_2/, tokenizer_2/],
    scheduler/scheduler_config.json

written by the pipeline's own diffusers `save_pretrained` (safetensors), unmodified, so that the
tests see what users have, and the very same folder loads both through renoise.models and through
diffusers (the oracle). The tokenizers are transformers' CLIPTokenizer over a tiny CLIP-style
byte-level BPE vocabulary built here (written as vocab.json + merges.txt by `save_tokenizer`, read
by transformers, then saved by the pipeline as transformers saves it: tokenizer.json): the 256 byte
symbols, their end-of-word forms, a few merges for the words the tests use, then the two special
tokens (so that <|endoftext|> has the largest id, as in CLIP, and pooling at argmax(ids) finds it).
The VAE downsamples by 8, as the real ones do; images of 32×32 px give 4×4 latents.
"""
import json
from pathlib import Path

import torch

from tiny_models import TINY_POOLED_DIM as PROJECTION_2      # the tiny SDXL UNet's pooled-embedding size

WORDS_MERGES = ["c a", "ca t</w>", "t i", "g e", "ti ge", "tige r</w>", "p h", "o t", "ph ot", "phot o</w>",
                "d o", "do g</w>"]
INPUT_SCALE = 0.01
TEXT_HIDDEN, TEXT_HIDDEN_2 = 32, 32                          # tiny sd1 UNet: cross-attention 32; sdxl: 64


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


def _tokenizer(pad_token="<|endoftext|>"):
    """transformers' CLIPTokenizer read from the hand-written files (in a temporary folder)."""
    import tempfile

    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(save_tokenizer(tmp, pad_token=pad_token)))


def _text_encoder(hidden, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(vocabulary()[0]), hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="gelu" if projection else "quick_gelu", projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(kind, seed):
    """tiny_models' UNet (sd1: cross-attention 32 = TEXT_HIDDEN; sdxl: 64 = both encoders) with its
    input convolution's weight scaled by INPUT_SCALE: the output keeps its size but varies slowly
    with the latent (as a trained model's noise prediction does near a clean image), so that
    ReNoise's fixed-point map contracts and inversions of the random model stay finite."""
    from tiny_models import make_tiny_unet
    unet = make_tiny_unet(kind, seed=seed)
    with torch.no_grad():
        unet.conv_in.weight.mul_(INPUT_SCALE)
    return unet


def _vae(kind, seed):
    """tiny_models' VAE widened to 4 levels, so that it downsamples by 8 like the real ones."""
    from tiny_models import make_tiny_vae
    return make_tiny_vae(kind, seed=seed, block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)


SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1)


def save_sd(folder, seed=0, scheduler="ddim"):
    """An SD 1.x-like pipeline (one CLIP encoder, DDIM scheduler as in SD 2.1) at `folder`."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    folder = Path(folder)
    tok = _tokenizer()
    sched = (DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCALED_LINEAR) if scheduler == "ddim"
             else EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SCALED_LINEAR))
    pipe = StableDiffusionPipeline(vae=_vae("sd", seed + 1), text_encoder=_text_encoder(TEXT_HIDDEN, seed=seed + 2),
                                   tokenizer=tok, unet=_unet("sd1", seed + 3), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_sdxl(folder, seed=0):
    """An SDXL-Turbo-like pipeline (two encoders, pooled embeds, time ids, Euler-ancestral trailing)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    folder = Path(folder)
    tok, tok2 = _tokenizer(), _tokenizer(pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=_vae("sdxl", seed + 1), text_encoder=_text_encoder(TEXT_HIDDEN, seed=seed + 2),
        text_encoder_2=_text_encoder(TEXT_HIDDEN_2, PROJECTION_2, seed=seed + 3), tokenizer=tok, tokenizer_2=tok2,
        unet=_unet("sdxl", seed + 4),
        scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SCALED_LINEAR),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def shared(tmp_path_factory):
    """{"sd": folder, "sdxl": folder}, saved once per test session (several test modules use them)."""
    root = tmp_path_factory.getbasetemp() / "tiny_pipelines"
    folders = {"sd": root / "sd", "sdxl": root / "sdxl"}
    for kind, save in (("sd", save_sd), ("sdxl", save_sdxl)):
        if not (folders[kind] / "model_index.json").is_file():
            save(folders[kind])
    return folders
