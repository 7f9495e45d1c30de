"""renoise: real-image inversion of diffusion models with ReNoise (Garibi et al., 2024).

Submodules load on first use, so `import renoise` stays cheap:

    renoise.schedules      discrete noise schedules and timestep selection
    renoise.samplers       pure step / inverse_step functions (ddim, euler_ancestral, lcm)
    renoise.fixed_point    generic fixed-point iteration (averaging, Anderson, tolerances)
    renoise.inversion      the ReNoise inversion loop; `renoise.invert` is its entry point
    renoise.diagnostics    convergence plots (residual curves, contraction estimates)
    renoise.speed          torch.compile / CUDA graphs switches; `renoise.accelerate` is its entry point
    renoise.models         pure-PyTorch UNet, VAE, CLIP text encoders and loaders
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "schedules", "samplers", "fixed_point", "toy", "inversion", "presets", "regularizers",
    "noise_correction", "pipeline", "images", "metrics", "models", "kernels", "diagnostics", "speed",
}
_ATTRIBUTES = {"invert": "inversion", "sample": "inversion", "Schedule": "schedules", "accelerate": "speed"}
_ATTRIBUTES["FlowSchedule"] = "schedules"      # rectified-flow schedules (SD3 / FLUX.1), sampler "flow_euler"
_SUBMODULES.add("flow")                         # SD3 / FLUX.1 pipelines: FlowDenoiser, generate_flow
_ATTRIBUTES["generate_flow"] = "flow"


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(f"{__name__}.{_ATTRIBUTES[name]}"), name)
    raise AttributeError(f"module 'renoise' has no attribute {name!r}")
_SUBMODULES.update({"denoisers", "compiling"})  # docs/layers.md: GuidedDenoiser & prompts; torch.compile machinery
