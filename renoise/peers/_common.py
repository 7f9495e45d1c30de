"""What the peers share: their result type, the chain walk, and the check that a sampler step is
deterministic (the exact methods and the Newton / null-text loops need `step` to be a fixed map).

A peer's inversion returns a `PeerResult`, which reads like renoise.inversion.InversionResult where
`renoise eval` looks (z_T, trajectory[0] = z0, residuals, model_calls, timesteps, chain) and keeps
whatever else its own sampling needs in `state` (EDICT's second latent, null-text's embeddings).
Costs: `model_calls` counts denoiser calls; `unet_evals` counts network evaluations at the image
batch (a CFG call is 2, the regularizer's doubled batch 2); `backward` counts backward passes
through the network at the image batch (null-text, GNRI), which renoise.peers.cost converts into
call-equivalents with a ratio measured on the machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import samplers as _samplers

FORMAT = "renoise.peers/1"


@dataclass
class PeerResult:
    """A peer's inversion: z_T [B, ...], trajectory [n+1, B, ...] (inversion order, [0] = z0),
    residuals (one [calls, B] per step, where the method iterates), costs, and `state`."""

    peer: str
    z_T: torch.Tensor
    trajectory: torch.Tensor
    schedule: object
    sampler: str
    num_steps: int
    timesteps: torch.Tensor
    model_calls: int = 0
    unet_evals: int = 0
    backward: int = 0
    residuals: list = field(default_factory=list)
    contraction: list = field(default_factory=list)
    state: dict = field(default_factory=dict)
    log: dict = field(default_factory=dict)          # per-step diagnostics (losses, objectives)
    noises: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def chain(self) -> list:
        return self.schedule.chain(self.num_steps, self.sampler)

    def save(self, path) -> None:
        """One safetensors file with z_T, the trajectory and the state's tensors (lists flattened)."""
        import json

        from safetensors.torch import save_file
        t = {"z_T": self.z_T, "trajectory": self.trajectory, "timesteps": self.timesteps}
        for k, v in self.state.items():
            for i, x in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, torch.Tensor):
                    t[f"state.{k}.{i}"] = x
        t = {k: v.detach().cpu().contiguous().clone() for k, v in t.items()}
        save_file(t, str(path), metadata={"format": FORMAT, "peer": self.peer, "sampler": self.sampler,
                                          "num_steps": str(self.num_steps), "model_calls": str(self.model_calls),
                                          "extra": json.dumps(self.extra)})


def deterministic(sampler, schedule, chain, what):
    """The sampler module, refusing one whose steps on `chain` add noise (the method needs a fixed map)."""
    smod = _samplers.get(sampler) if isinstance(sampler, str) else sampler
    if any(smod.is_stochastic(tn) for _, tn in chain):
        raise ValueError(f"{what} needs a deterministic sampler step; {smod.NAME!r} adds noise on this chain "
                         "(use ddim)")
    return smod


def check_latent(z0):
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.dim() < 2:
        raise ValueError("z0 must be a floating-point tensor [B, ...]")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or inf")


def timesteps(chain) -> torch.Tensor:
    return torch.tensor([t for t, _ in chain])
