"""Tiny random-weight SD3 and FLUX.1 pipelines saved by diffusers' own save_pretrained (whole pipeline).

    save_sd3(folder, t5=True)          StableDiffusion3Pipeline (CLIP-L, CLIP-G with projection, T5 or None)
    save_flux(folder, kind="dev")      FluxPipeline (CLIP-L, T5), dev: guidance embedding; schnell: none

Components: tiny_dit's transformers (widened to the text widths here), tiny_pipeline's CLIP tokenizer
and encoders, a 4-level (×8) 16→4-channel... VAE with a shift factor, a transformers T5EncoderModel and
a T5TokenizerFast over a SentencePiece Unigram model trained here. diffusers / transformers /
sentencepiece are test oracles only.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch

CLIP_HIDDEN = 16          # CLIP-L and CLIP-G widths (SD3: 16 + 16 = 32 ≤ the joint width; pooled 32)
JOINT = 48                # joint_attention_dim = T5 d_model


def _t5_tokenizer(folder: Path):
    import sentencepiece as spm
    import transformers
    rng = random.Random(0)
    syll = ["ka", "ri", "to", "mu", "sen", "the", "photo", "cat", "dog", "a", "of", "red", "st", "o"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(600)] + ["a photo of a cat"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=120,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spm").mkdir(parents=True, exist_ok=True)
    (folder / "spm" / "spiece.model").write_bytes(buf.getvalue())
    return transformers.T5TokenizerFast.from_pretrained(folder / "spm")


def _t5(vocab: int, seed: int):
    import transformers
    cfg = transformers.T5Config(vocab_size=vocab, d_model=JOINT, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(seed)
    m = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _vae(seed: int, shift: float, scale: float):
    from tiny_pipeline import _vae as unet_vae
    vae = unet_vae("sd", seed)            # 4 levels (×8), 4 latent channels, tiny widths
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def _randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def save_sd3(folder, *, t5: bool = True, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_dit import tiny_sd3_config
    from tiny_pipeline import _text_encoder, _tokenizer
    folder = Path(folder)
    cfg = dict(tiny_sd3_config("sd3"), joint_attention_dim=JOINT, pooled_projection_dim=2 * CLIP_HIDDEN)
    transformer = _randomise(SD3Transformer2DModel(**cfg), seed)
    tok3 = te3 = None
    if t5:
        tok3 = _t5_tokenizer(folder.parent / (folder.name + "-spm"))
        te3 = _t5(len(tok3), seed + 5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, 0.0609, 1.5305),
        text_encoder=_text_encoder(CLIP_HIDDEN, CLIP_HIDDEN, seed=seed + 2), tokenizer=_tokenizer(),
        text_encoder_2=_text_encoder(CLIP_HIDDEN, CLIP_HIDDEN, seed=seed + 3), tokenizer_2=_tokenizer(pad_token="!"),
        text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_flux(folder, *, kind: str = "dev", seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tiny_dit import tiny_flux_config
    from tiny_pipeline import _text_encoder, _tokenizer
    folder = Path(folder)
    cfg = dict(tiny_flux_config(kind), joint_attention_dim=JOINT, pooled_projection_dim=CLIP_HIDDEN)
    transformer = _randomise(FluxTransformer2DModel(**cfg), seed)
    tok2 = _t5_tokenizer(folder.parent / (folder.name + "-spm"))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=4, max_image_seq_len=64)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(seed + 1, 0.1159, 0.3611),
                        text_encoder=_text_encoder(CLIP_HIDDEN, seed=seed + 2), tokenizer=_tokenizer(),
                        text_encoder_2=_t5(len(tok2), seed + 5), tokenizer_2=tok2)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
