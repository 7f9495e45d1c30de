"""The peers of ReNoise as methods of the same core: exact (EDICT, BDIA), optimisation-based
(null-text, negative-prompt), fixed-point and Newton (AIDI, fixed-point with CFG, GNRI), and plain
DDIM inversion with and without CFG, the floor.

Each is built on renoise.fixed_point / renoise.invert, the samplers' step / inverse_step and the
denoiser interface (denoiser(x, t)); none is a second pipeline. The loops that are not ReNoise plans
live in small modules over any denoiser:

    renoise.peers.exact      edict_invert / edict_sample, bdia_invert / bdia_sample
    renoise.peers.nulltext   optimize_nulls (null-text's per-step embeddings), sample
    renoise.peers.newton     gnri_invert (Newton–Raphson with the prior term)
    renoise.peers.cost       backward_ratio: a backward pass in call-equivalents, measured
    renoise.peers.editors    the same on a loaded pipeline, for `renoise eval`

`PEERS` names each peer with its paper's settings (the modules' docstrings say where they come
from); `resolve(name, **overrides)` gives a spec, `renoise eval --methods peers` runs them all
(`GROUP`), and a single one is named like any method (`edict`, or `edict-g1:peer=edict,guidance=1`).
"""
from __future__ import annotations

from .exact import BDIA_GAMMA, EDICT_P, bdia_invert, bdia_sample, edict_invert, edict_sample
from .newton import gnri_invert
from .nulltext import optimize_nulls

__all__ = ["PEERS", "GROUP", "PAPERS", "resolve", "edict_invert", "edict_sample", "bdia_invert", "bdia_sample",
           "gnri_invert", "optimize_nulls"]

_SOURCE = dict(edit_guidance=None, edit_negative="source")      # ReNoise's edit protocol, the run's guidance
_P2P = dict(edit_negative="empty")                               # Prompt-to-Prompt's: edit prompt vs ""

# name -> kind, settings. A "plan" peer's `plan` holds the renoise.presets.Plan fields it sets.
PEERS = {
    "ddim-inversion": dict(kind="plan", plan=dict(iters=0), guidance=1.0, **_SOURCE),
    "ddim-inversion-cfg": dict(kind="plan", plan=dict(iters=0), guidance=7.5, edit_guidance=7.5, **_P2P),
    "fixed-point-cfg": dict(kind="plan", plan=dict(iters=3, average=False), guidance=7.5, edit_guidance=7.5, **_P2P),
    "aidi": dict(kind="plan", plan=dict(iters=5, anderson=3, average=False), guidance=1.0, **_SOURCE),
    "negative-prompt": dict(kind="plan", plan=dict(iters=0), guidance=1.0, edit_guidance=7.5, edit_negative="source"),
    "null-text": dict(kind="null-text", guidance=7.5, inner_steps=10, lr=1e-2, early_stop=1e-5, edit_guidance=7.5,
                      edit_negative="null"),
    "edict": dict(kind="edict", p=EDICT_P, guidance=3.0, edit_guidance=3.0, **_P2P),
    "bdia": dict(kind="bdia", gamma=BDIA_GAMMA, guidance=1.0, **_SOURCE),
    "gnri": dict(kind="gnri", iters=2, lam=0.1, autograd=False, eta=1e-3, guidance=1.0, **_SOURCE),
}

PAPERS = {
    "ddim-inversion": "Song, Meng, Ermon, DDIM (ICLR 2021), Sec. 4.3: the ODE run backwards, ε taken at the known point",
    "ddim-inversion-cfg": "DDIM inversion with guidance 7.5 in both directions: the failure case of Mokady et al. "
                          "(null-text, CVPR 2023), Sec. 3.1 / Fig. 3",
    "fixed-point-cfg": "fixed-point iteration of the inversion step with CFG in the map (Pan et al., AIDI, ICCV 2023, "
                       "Sec. 3, its un-accelerated iteration; Meiri et al., fixed-point inversion, arXiv 2312.12540v1); "
                       "K = 3 iterations a step, guidance 7.5",
    "aidi": "Pan, Gherardi, Xie, Huang, 'Effective Real Image Editing with Accelerated Iterative Diffusion Inversion', "
            "ICCV 2023, Sec. 3.2: Anderson acceleration of the fixed-point step, from z_{t-1}: one plain call, then "
            "K = 5 accelerated ones (6 calls a step), window m = 3 (3 differences, 4 residuals), mixing 1, no "
            "regularisation or tolerance, no CFG in the inversion (guidance 1). The paper's text could not be read "
            "here; these are the settings of the public reimplementation github.com/wmchen/diffusion-inversion "
            "(inversions/aidi.py, configs/aidi_a.yaml: num_iter_steps 5, m 3, Anderson, guidance 0), which the "
            "plan matches; our Anderson is renoise.fixed_point's safeguarded one (trust region, reg 1e-6)",
    "negative-prompt": "Miyake et al., 'Negative-prompt Inversion', 2023, Sec. 3: DDIM inversion, edit with the source "
                       "prompt as negative at guidance 7.5",
    "null-text": "Mokady et al., 'Null-text Inversion', CVPR 2023, Sec. 3.3, Algorithm 1: N = 10 Adam steps, lr 0.01, "
                 "early stop 1e-5, guidance 7.5",
    "edict": "Wallace, Gokul, Naik, 'EDICT', CVPR 2023, Sec. 3 (Eqs. 14-15), p = 0.93 and guidance 3 (Sec. 4)",
    "bdia": "Zhang, Lewis, Kleijn, 'Exact Diffusion Inversion via Bi-directional Integration Approximation', "
            "ECCV 2024, Sec. 4 (BDIA-DDIM), γ = 1",
    "gnri": "Samuel et al., 'Lightning-Fast Image Inversion and Editing for Text-to-Image Diffusion Models' (GNRI), "
            "ICLR 2025, arXiv 2312.12540v5, Sec. 4: F = ‖z - G(z)‖₁ + λ‖z - μ‖₂/β, Newton–Raphson from z_{t-1}, "
            "2 iterations, λ = 0.1, the model's output held fixed in ∂F/∂z (no backward pass) as in the authors' "
            "code github.com/dvirsamuel/NewtonRaphsonInversion; renoise.peers.newton says what differs",
}

GROUP = list(PEERS)
_COMMON = ("guidance", "edit_guidance", "edit_negative")
_NEGATIVES = {"source", "empty", "null"}


def resolve(name: str, **overrides) -> dict:
    """The spec of peer `name` with `overrides` (its settings, guidance, edit_guidance, edit_negative,
    and for plan peers any Plan field) applied; refuses unknown names and fields."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PEERS[name].items()}
    spec["name"] = name
    for key, value in overrides.items():
        if key in spec and key not in ("kind", "plan", "name"):
            spec[key] = value
        elif spec["kind"] == "plan" and key not in _COMMON:
            import dataclasses

            from ..presets import Plan
            if key not in {f.name for f in dataclasses.fields(Plan)} or key in ("name", "guidance_scale"):
                raise ValueError(f"peer {name!r}: unknown field {key!r}; known: guidance, edit_guidance, "
                                 f"edit_negative, and the plan's fields")
            spec["plan"][key] = value
        else:
            known = sorted(k for k in spec if k not in ("kind", "plan", "name"))
            raise ValueError(f"peer {name!r}: unknown field {key!r}; known: {', '.join(known)}")
    if spec["edit_negative"] not in _NEGATIVES:
        raise ValueError(f"peer {name!r}: edit_negative must be one of {', '.join(sorted(_NEGATIVES))}, "
                         f"got {spec['edit_negative']!r}")
    return spec
