"""Pure-PyTorch Stable Diffusion models (UNet, VAE, CLIP text encoders) and their loaders.

Imported as `renoise.models`. Names load on first use, so importing the package is cheap.
"""

if __name__ != "renoise.models":      # imported as a bare `models` from a clone's root
    from renoise._clone_guard import step_aside
    step_aside(__name__, __file__)

import importlib

_EXPORTS = {
    # architecture configs
    "UNetConfig": "configs", "VAEConfig": "configs", "unet_config": "configs", "vae_config": "configs",
    # modules
    "UNet": "unet", "AutoencoderKL": "vae",
    "CLIPTextModel": "clip", "CLIPTextConfig": "clip", "CLIPTokenizer": "tokenizer",
    # loading
    "load_unet": "loading", "load_vae": "loading", "load_state_dict": "loading",
    "load_text_encoder": "clip", "load_tokenizer": "tokenizer",
    "Pipeline": "pipeline", "load_pipeline": "pipeline",
    "load_single_file": "single_file",
    "merge_lora": "lora", "load_lora": "lora",
    # T5 v1.1 encoder (SD3, FLUX.1) and its tokenizer (the tokenizer needs renoise[t5])
    "T5Config": "t5", "T5EncoderModel": "t5", "load_t5_encoder": "t5",
    "T5Tokenizer": "t5_tokenizer", "load_t5_tokenizer": "t5_tokenizer",
    # flow-matching transformers
    "SD3Config": "mmdit", "SD3Transformer": "mmdit", "sd3_config": "mmdit",
    "FluxConfig": "flux", "FluxTransformer": "flux", "flux_config": "flux",
    "load_transformer": "transformer_loading", "load_sd3_transformer": "transformer_loading",
    "load_flux_transformer": "transformer_loading",
    "enable_offload": "offload",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'renoise.models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
