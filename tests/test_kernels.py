"""renoise.kernels: each Triton kernel equals its PyTorch reference, on CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here when there is no GPU) or on CUDA; the switch routes the
UNet through the kernel without changing its output."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before any kernel is compiled
pytest.importorskip("triton", reason="needs triton (pip install triton, or renoise[gpu]); the kernels are an extra")

from renoise import kernels  # noqa: E402
from renoise.kernels.group_norm_silu import BLOCK, group_norm_silu, group_norm_silu_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("shape,groups", [((2, 32, 8, 8), 8), ((1, 16, 40, 40), 4), ((3, 6, 5, 7), 3)],
                         ids=["one-chunk", "several-chunks", "odd-sizes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_group_norm_silu_equals_reference(shape, groups, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g) + 2).to(DEVICE, dtype)        # far from zero mean
    w, b = (torch.randn(shape[1], generator=g).to(DEVICE, dtype) for _ in range(2))
    want = group_norm_silu_reference(x.float(), groups, w.float(), b.float(), 1e-6)
    got = group_norm_silu(x, groups, w, b, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    if shape == (1, 16, 40, 40):
        assert (16 // groups) * 40 * 40 > BLOCK                  # the chunks' combination was exercised
    no_affine = group_norm_silu(x, groups)
    torch.testing.assert_close(no_affine.float(), group_norm_silu_reference(x.float(), groups), rtol=tol, atol=tol)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="divisible by groups=4"):
        group_norm_silu(torch.zeros(1, 6, 2, 2, device=DEVICE), 4)


def test_switch_routes_the_unet_through_the_kernel(monkeypatch):
    from tiny_models import make_tiny_unet, unet_inputs

    from renoise.kernels import group_norm_silu as module
    from renoise.models import UNet, UNetConfig
    ref = make_tiny_unet("sd1")
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(dict(ref.config)))
    unet.load_state_dict(ref.state_dict(), assign=True)
    unet = unet.eval().to(DEVICE)
    x, t, ctx, _ = unet_inputs("sd1", batch=1)
    calls = []
    real = module.group_norm_silu
    monkeypatch.setattr(module, "group_norm_silu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        want = unet(x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE))
        try:
            kernels.use(True)
            got = unet(x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE))
        finally:
            kernels.use(False)
    from renoise.models.blocks import ResnetBlock
    assert len(calls) == 2 * sum(isinstance(m, ResnetBlock) for m in unet.modules()) + 1   # + the output's
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
