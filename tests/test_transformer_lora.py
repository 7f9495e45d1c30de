"""diffusers/PEFT LoRA files for the SD3 and Flux transformers: merged into ours, the output equals
diffusers' model running the same adapter through PEFT (unmerged)."""
import pytest
import torch

from renoise.models.flux import FluxTransformer
from renoise.models.lora import LoraError, load_lora, merge_lora
from renoise.models.mmdit import SD3Transformer
from renoise.models.transformer_loading import load_transformer
from tiny_dit import flux_inputs, rel_err, save_tiny_flux, save_tiny_sd3, sd3_inputs

TARGETS = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj",
             "norm1.linear", "x_embedder", "context_embedder"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff_context.net.2", "norm1_context.linear",
            "proj_out", "pos_embed.proj"],
}


def _adapter(theirs, family, alpha, seed=0):
    """Attach a rank-4 PEFT LoRA with random A and B; returns its diffusers-format state dict and config."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS[family], init_lora_weights=False)
    theirs.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return get_peft_model_state_dict(theirs), config


def _save(folder, family, layers, config):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    pipe = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def _run(model, family, inp):
    with torch.no_grad():
        if isinstance(model, FluxTransformer):
            return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"],
                         inp["pooled_projections"], inp["img_ids"], inp["txt_ids"], guidance=inp["guidance"])
        if isinstance(model, SD3Transformer):
            return model(inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["pooled_projections"])
        return model(**inp).sample


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_lora_file_merges_like_peft(tmp_path, family):
    if family == "flux":
        theirs, inp = save_tiny_flux(tmp_path / "model", "dev"), flux_inputs("dev")
    else:
        theirs, inp = save_tiny_sd3(tmp_path / "model", "sd35-medium"), sd3_inputs("sd35-medium")
    base = _run(theirs, family, inp)
    layers, config = _adapter(theirs, family, alpha=8)           # alpha 8 / rank 4: scale 2, from the metadata
    want = _run(theirs, family, inp)
    assert rel_err(want, base) > 1e-3                           # the adapter does something
    f = _save(tmp_path / "lora", family, layers, config)
    assert all(k.startswith("transformer.") for k in load_lora(f) if not k.endswith(".alpha"))

    ours = load_transformer(tmp_path / "model")
    merge_lora(ours, f)
    assert rel_err(_run(ours, family, inp), want) < 1e-5
    merge_lora(ours, f, unmerge=True)
    assert rel_err(_run(ours, family, inp), base) < 1e-5

    # the same file through diffusers' own pipeline loader (which reads lora_alpha from the metadata)
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
    pipe, cls = ((FluxPipeline, FluxTransformer2DModel) if family == "flux" else
                 (StableDiffusion3Pipeline, SD3Transformer2DModel))
    fresh = cls.from_pretrained(tmp_path / "model")
    sd, meta = pipe.lora_state_dict(str(f), return_lora_metadata=True)
    kw = {"network_alphas": None} if family == "flux" else {}
    pipe.load_lora_into_transformer(sd, transformer=fresh, metadata=meta, **kw)
    assert rel_err(_run(fresh, family, inp), want) < 1e-6


def test_unprefixed_peft_keys_and_scale(tmp_path):
    theirs = save_tiny_flux(tmp_path / "model", "schnell")
    inp = flux_inputs("schnell")
    layers, _ = _adapter(theirs, "flux", alpha=4)               # alpha = r: scale 1
    want = _run(theirs, "flux", inp)
    ours = load_transformer(tmp_path / "model")
    merged = merge_lora(ours, layers, inplace=False)           # PEFT's own names, no "transformer." prefix
    assert rel_err(_run(merged, "flux", inp), want) < 1e-5
    assert merged is not ours
    with pytest.raises(LoraError, match="match no layer"):
        merge_lora(ours, {"transformer.nowhere.lora_A.weight": torch.ones(4, 8),
                          "transformer.nowhere.lora_B.weight": torch.ones(8, 4)})
