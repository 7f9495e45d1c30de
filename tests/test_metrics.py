"""renoise.metrics: PSNR, SSIM (against a loop-by-loop reference), latent metrics, LPIPS files."""
import math

import numpy as np
import pytest
import torch

from renoise import metrics


def test_psnr_hand_checked():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1                                # mse 0.01 with range 2: 10·log10(4 / 0.01)
    y[1, :, :4] = 1.0                          # half the pixels off by 1: mse 0.5
    p = metrics.psnr(y, x)
    assert p.shape == (2,)
    assert p[0].item() == pytest.approx(10 * math.log10(400), rel=1e-6)
    assert p[1].item() == pytest.approx(10 * math.log10(8), rel=1e-6)
    assert metrics.psnr(x, x)[0].item() == math.inf
    assert metrics.psnr(y, x, data_range=1.0)[0].item() == pytest.approx(20.0, rel=1e-6)


def test_ssim_constant_images_hand_checked():
    a, b = 0.3, -0.2
    x, y = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))
    c1 = (0.01 * 2) ** 2
    assert metrics.ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def reference_ssim(x, y, data_range, size=11, sigma=1.5):
    """SSIM written plainly: for every channel and every valid window position, weighted stats."""
    x, y = x.double().numpy(), y.double().numpy()
    size = min(size, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for b in range(x.shape[0]):
        vals = []
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - size + 1):
                for j in range(x.shape[3] - size + 1):
                    px, py = x[b, c, i:i + size, j:j + size], y[b, c, i:i + size, j:j + size]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                    cov = (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


@pytest.mark.parametrize("shape", [(2, 3, 16, 14), (3, 4, 6, 5)])      # images; tiny latents
def test_ssim_matches_reference(shape, rng):
    x = torch.rand(shape, generator=rng) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=rng)).clamp(-1, 1)
    ours = metrics.ssim(x, y)
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours.numpy(), reference_ssim(x, y, 2.0), rtol=1e-10)
    assert (ours < 1).all()


def test_ssim_batch_equals_single(rng):
    x, y = torch.randn(3, 3, 12, 12, generator=rng), torch.randn(3, 3, 12, 12, generator=rng)
    whole = metrics.ssim(x, y)
    for i in range(3):
        assert metrics.ssim(x[i:i + 1], y[i:i + 1]).item() == pytest.approx(whole[i].item(), rel=1e-12)


def test_latent_metrics_use_reference_range(rng):
    ref = torch.randn(2, 4, 4, 6, generator=rng)
    z = ref + 0.01 * torch.randn(2, 4, 4, 6, generator=rng)
    m = metrics.latent_metrics(z, ref)
    span = ref.flatten(1).max(1).values - ref.flatten(1).min(1).values
    torch.testing.assert_close(m["psnr"], metrics.psnr(z, ref, span))
    torch.testing.assert_close(m["rmse"], (z - ref).pow(2).flatten(1).mean(1).sqrt())
    np.testing.assert_allclose(m["ssim"][1].item(), reference_ssim(z[1:], ref[1:], span[1].item())[0], rtol=1e-10)


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def save_random_lpips(tmp_path, rng):
    backbone = {}
    for idx, cin, cout, k, *_ in metrics._CONVS:
        backbone[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=rng) / (cin * k * k) ** 0.5
        backbone[f"features.{idx}.bias"] = torch.randn(cout, generator=rng) * 0.1
    heads = {f"lin{n}.model.1.weight": torch.rand(1, c[2], 1, 1, generator=rng) for n, c in enumerate(metrics._CONVS)}
    torch.save(backbone, tmp_path / metrics.ALEXNET_FILE)
    torch.save(heads, tmp_path / metrics.LPIPS_FILE)


def test_lpips_from_local_files(tmp_path, rng, monkeypatch):
    save_random_lpips(tmp_path, rng)
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path))
    x = torch.rand(2, 3, 64, 64, generator=rng) * 2 - 1
    y = (x + 0.5 * torch.randn(2, 3, 64, 64, generator=rng)).clamp(-1, 1)
    d = metrics.lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert metrics.lpips(x, x).abs().max() < 1e-6
    torch.testing.assert_close(metrics.lpips(y, x), d)
    torch.testing.assert_close(metrics.lpips(x[1:], y[1:]), d[1:])


def test_lpips_missing_weights_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("RENOISE_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(metrics.LPIPSWeightsMissing, match="never downloads"):
        metrics.lpips(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
