"""The demo model: a small Stable Diffusion-shaped text-to-image model of a tiny world of shapes.

    from renoise.models import load_pipeline
    pipe = load_pipeline("demo")                   # the trained weights shipped in this package
    scene = renoise.demo.held_out(0)               # a scene the model never saw in training
    image = renoise.demo.render_tensor(scene)      # [1, 3, 128, 128] in [-1, 1]

`scenes` renders captioned scenes, `checks` judges images by the renderer's own colours and masks,
`model` holds the architecture and folder layout, `train` trains it all from scratch
(`python -m renoise.demo.train --out DIR`). MODEL_CARD.md says how it was made and what it can do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, random_scene, render, shape_masks

__all__ = ["MODEL_DIR", "FLOW_MODEL_DIR", "HELD_OUT", "held_out", "render_tensor", "Scene", "Shape", "random_scene", "render",
           "shape_masks", "COLOURS", "SHAPES", "SIZES", "POSITIONS"]

MODEL_DIR = Path(__file__).with_name("weights")      # the diffusers folder of the trained model
FLOW_MODEL_DIR = Path(__file__).with_name("flow_weights")   # the demo flow model (StableDiffusion3Pipeline folder)
HELD_OUT = 10 ** 9                                   # training uses seeds below this; held-out scenes above


def held_out(i: int, max_shapes: int = 1, **kwargs) -> Scene:
    """Held-out scene number i (seed HELD_OUT + i); one shape by default."""
    return random_scene(HELD_OUT + i, max_shapes=max_shapes, **kwargs)


def render_tensor(scenes) -> torch.Tensor:
    """One scene or a list, rendered as [B, 3, 128, 128] float32 in [-1, 1]."""
    scenes = [scenes] if isinstance(scenes, Scene) else list(scenes)
    return torch.from_numpy(np.stack([render(s) for s in scenes])) * 2 - 1
