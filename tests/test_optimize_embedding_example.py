"""examples/optimize_embedding.py: the reconstruction error falls through a differentiable inversion."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "optimize_embedding.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("optimize_embedding", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("grad", ["unrolled", "phantom"])
def test_reconstruction_error_decreases(example, grad):
    losses = example.main(iters=5, grad=grad, verbose=False)
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
