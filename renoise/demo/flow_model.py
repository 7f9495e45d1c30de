"""The demo flow model's architecture and its diffusers StableDiffusion3Pipeline folder layout.

A rectified-flow model of the same 128 px scenes as the demo model, reusing its parts frozen:

    VAE              the demo VAE (4 latent channels, f = 8); shift_factor 0.0, the demo's scaling_factor
    text_encoder(_2) the demo CLIP text model as CLIPTextModelWithProjection, identity projection (128 → 128),
                     used as both of SD3's CLIP encoders; no T5 (text_encoder_3 = None)
    transformer      SD3Transformer2DModel, patch 2, 4 → 4 channels: the only trained part
    scheduler        FlowMatchEulerDiscreteScheduler, shift 1.0 (the model was trained at 64 tokens only,
                     with logit-normal σ; SD3's shift 3.0 is for 4096-token 1024 px images)

SD3's conditioning is [CLIP-L ; CLIP-G] penultimate hidden states (here 128 + 128 = 256 channels =
joint_attention_dim) over 77 tokens, followed by `MAX_SEQUENCE_LENGTH` zero "T5" tokens, and the pooled
[text_embeds ; text_embeds] (256). The model was trained with exactly MAX_SEQUENCE_LENGTH zero tokens:
diffusers' StableDiffusion3Pipeline needs `max_sequence_length=MAX_SEQUENCE_LENGTH` to match
(its default 256 adds 256 copies of that token, which shifts the attention logits by log 256).
`load_pipeline("demo-flow")` sets it on the FlowPipeline.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..models.mmdit import SD3Config
from . import model as demo_model

__all__ = ["TRANSFORMER", "MAX_SEQUENCE_LENGTH", "SCHEDULER", "MODEL_INDEX", "transformer_diffusers_config",
           "init_transformer", "write_flow_folder"]

MAX_SEQUENCE_LENGTH = 1          # zero T5 tokens appended to the 77 CLIP tokens (trained with exactly this many)
TEXT_WIDTH = 128                 # the demo CLIP text model's width (= its projection_dim)

TRANSFORMER = SD3Config(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=5, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=128,
    pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16, qk_norm="rms_norm")

SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
             "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
             "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
             "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False}

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "text_encoder_3": [None, None], "tokenizer_3": [None, None],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def transformer_diffusers_config(c: SD3Config = TRANSFORMER) -> dict:
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1", "sample_size": c.sample_size,
            "patch_size": c.patch_size, "in_channels": c.in_channels, "num_layers": c.num_layers,
            "attention_head_dim": c.attention_head_dim, "num_attention_heads": c.num_attention_heads,
            "joint_attention_dim": c.joint_attention_dim, "caption_projection_dim": c.caption_projection_dim,
            "pooled_projection_dim": c.pooled_projection_dim, "out_channels": c.out_channels,
            "pos_embed_max_size": c.pos_embed_max_size, "dual_attention_layers": list(c.dual_attention_layers),
            "qk_norm": c.qk_norm}


@torch.no_grad()
def init_transformer(model, seed: int = 0):
    """DiT-style initialisation: Xavier-uniform linears with zero bias, zero AdaLN-Zero modulations and
    a zero output projection (every block starts as the identity, the model as v = 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = (6.0 / (m.in_features + m.out_features)) ** 0.5
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 * bound - bound)
            if m.bias is not None:
                m.bias.zero_()
            if name.endswith(".linear") and ("norm1" in name or "norm_out" in name):
                m.weight.zero_()
    model.proj_out.weight.zero_()
    model.proj_out.bias.zero_()
    return model


def _save_state(state: dict, path: Path, config: dict, filename: str, dtype):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, str(path / filename),
              metadata={"format": "pt"})


def _text_encoder_config(demo_folder: Path) -> dict:
    cfg = json.loads((demo_folder / "text_encoder" / "config.json").read_text())
    if cfg["hidden_size"] != TEXT_WIDTH or cfg["projection_dim"] != TEXT_WIDTH:
        raise ValueError(f"the demo text encoder has width {cfg['hidden_size']}, expected {TEXT_WIDTH}")
    return dict(cfg, architectures=["CLIPTextModelWithProjection"])


def write_flow_folder(folder, transformer, *, demo_folder=None, dtype=torch.float16, readme: str | None = None) -> Path:
    """Save `transformer` (an SD3Transformer of config TRANSFORMER) with the demo model's VAE (shift_factor 0),
    text encoder (twice, with an identity text_projection) and tokenizer (twice) as a StableDiffusion3Pipeline
    folder that both `renoise.models.load_pipeline` and diffusers load."""
    from safetensors.torch import load_file

    from . import MODEL_DIR

    demo_folder = Path(demo_folder or MODEL_DIR)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    _save_state(transformer.state_dict(), folder / "transformer", transformer_diffusers_config(transformer.config),
                "diffusion_pytorch_model.safetensors", dtype)

    vae_cfg = json.loads((demo_folder / "vae" / "config.json").read_text())
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae_cfg, shift_factor=0.0), indent=1))
    shutil.copyfile(demo_folder / "vae" / "diffusion_pytorch_model.safetensors",
                    folder / "vae" / "diffusion_pytorch_model.safetensors")

    text = load_file(str(demo_folder / "text_encoder" / "model.safetensors"))
    text["text_projection.weight"] = torch.eye(TEXT_WIDTH, dtype=next(iter(text.values())).dtype)
    for sub in ("text_encoder", "text_encoder_2"):
        _save_state(text, folder / sub, _text_encoder_config(demo_folder), "model.safetensors", dtype)
    for sub in ("tokenizer", "tokenizer_2"):
        demo_model.write_tokenizer(folder / sub)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder
