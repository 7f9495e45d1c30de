"""The parts of a Stable Diffusion 1.x / 2.x or SDXL pipeline, as `load_pipeline` and
`load_single_file` return them (renoise.models.Pipeline; re-exported by models.pipeline). The flow
pipelines' counterpart is flow_pipeline.FlowPipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Pipeline"]


@dataclass
class Pipeline:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    text_encoder_2: nn.Module | None = None      # SDXL's OpenCLIP bigG (with projection)
    tokenizer_2: object | None = None
    scheduler_config: dict | None = None         # diffusers scheduler_config.json
    kind: str = "sd"                             # "sd" (1.x / 2.x) | "sdxl"
    force_zeros_for_empty_prompt: bool = False   # SDXL: the unconditional branch is zeros, not encode("")

    @property
    def prediction_type(self) -> str:
        """The scheduler config's prediction type ("epsilon" when it names none)."""
        return (self.scheduler_config or {}).get("prediction_type", "epsilon")

    def modules(self) -> dict[str, nn.Module]:
        """The present networks by their diffusers component name."""
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
