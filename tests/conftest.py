import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Triton reads TRITON_INTERPRET once, when it is first imported (diffusers and torch may import it
# while other test modules are collected), so the kernels' CPU tests need it set before anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's models are tiny: one intra-op thread is several times faster than two on a
# 2-core machine, where threads wait on each other.
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    """A fresh, seeded torch generator for each test."""
    return torch.Generator().manual_seed(0)
