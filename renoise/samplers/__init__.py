"""Samplers as modules of pure functions sharing one signature (see docs/interfaces.md)."""
import importlib

NAMES = ("ddim", "euler_ancestral", "lcm", "flow_euler")


def get(name):
    """The sampler module called `name` ("ddim", "euler_ancestral", "lcm", "flow_euler")."""
    if name not in NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
