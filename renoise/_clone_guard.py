"""Keep a clone's top-level `models/` and `kernels/` folders from acting as packages of those names.

Both folders are installed as `renoise.models` and `renoise.kernels`. Run from a clone's root, where
Python puts the working directory first on `sys.path`, `import kernels` (Hugging Face's package, which
transformers imports) or `import models` would find the folder instead. Each folder's `__init__`
calls `step_aside` when it is imported under its bare name: the import is handed to whatever that
name means without the clone on the path, or fails as it would there.
"""
import importlib
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace the half-imported top-level module `name` by the one found without this clone's root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    ours = sys.modules.pop(name)
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.invalidate_caches()
        sys.modules[name] = importlib.import_module(name)
    except ImportError:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {name}/ of the renoise clone at {root} is "
            f"renoise.{name}, not a top-level package", name=name) from None
    finally:
        sys.path[:] = saved
        if sys.modules.get(name) is ours:
            del sys.modules[name]
