"""Edit-enhancement regularizers against plain per-channel loop references (REFERENCE-BEHAVIOUR.md);
the whole regularizer against the official algorithm's (tests/official_renoise.py)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from renoise import regularizers as R

import official_renoise as official  # noqa: E402


# ---------------------------------------------------------------- loop references (batch 1, [C, H, W])

def kl_loop(e, e_ref, p=4):
    c, h, w = e.shape
    total = e.new_zeros(())
    for ch in range(c):
        for i in range(h // p):
            for j in range(w // p):
                a = e[ch, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                b = e_ref[ch, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                m0, v0, m1, v1 = a.mean(), a.var(), b.mean(), b.var()
                kl = torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1
                total = total + torch.abs(kl)
    return total


def ac_loop(e, generator=None, shifts=None):
    """Per channel, per scale, shift drawn with randint(0, h // 2) in (channel, scale) order."""
    total = e.new_zeros(())
    used = []
    for ch in range(e.shape[0]):
        x = e[ch][None, None]
        k = 0
        while True:
            if shifts is None:
                s = int(torch.randint(0, x.shape[2] // 2, (1,), generator=generator).item())
            else:
                s = int(shifts[ch, k])
            used.append(s)
            total = total + (x * torch.roll(x, s, dims=2)).mean() ** 2
            total = total + (x * torch.roll(x, s, dims=3)).mean() ** 2
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, 2)
            k += 1
    return total, used


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("hw", [(8, 8), (16, 12), (20, 20)])
def test_patch_kl_loss_and_grad_match_loop(hw, rng):
    e = torch.randn(3, 4, *hw, generator=rng, dtype=torch.float64)
    ref = torch.randn(3, 4, *hw, generator=rng, dtype=torch.float64) * 0.7 + 0.1
    x = e.clone().requires_grad_(True)
    loss = R.patch_kl_loss(x, ref)
    (g,) = torch.autograd.grad(loss.sum(), x)
    for b in range(3):
        xb = e[b].clone().requires_grad_(True)
        lb = kl_loop(xb, ref[b])
        lb.backward()
        torch.testing.assert_close(loss[b], lb, rtol=1e-10, atol=0)
        torch.testing.assert_close(g[b], xb.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(R.patch_kl_grad(e, ref), g, rtol=1e-9, atol=1e-12)     # closed form


@pytest.mark.parametrize("hw", [(8, 8), (32, 32), (24, 16), (17, 18)])
def test_autocorr_loss_and_grad_match_loop(hw, rng):
    b, c = 2, 4
    e = torch.randn(b, c, *hw, generator=rng, dtype=torch.float64)
    scales = len(R.pyramid_heights(*hw))
    shifts = R.draw_shifts(rng, b, c, *hw, 1, 1)[0, 0]
    assert shifts.shape == (b, c, scales)
    x = e.clone().requires_grad_(True)
    loss = R.autocorr_loss(x, shifts)
    (g,) = torch.autograd.grad(loss.sum(), x)
    for i in range(b):
        xb = e[i].clone().requires_grad_(True)
        lb, used = ac_loop(xb, shifts=shifts[i])
        lb.backward()
        torch.testing.assert_close(loss[i], lb, rtol=1e-10, atol=0)
        torch.testing.assert_close(g[i], xb.grad, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(R.autocorr_grad(e, shifts)[i], xb.grad, rtol=1e-9, atol=1e-14)   # closed form


def test_shifts_follow_reference_draw_order():
    """One vectorised draw equals the reference's sequential randint(0, h // 2) calls."""
    rounds, rolls, c, h = 2, 3, 4, 40          # heights 40, 20, 10, 5 -> highs 20, 10, 5, 2
    shifts = R.draw_shifts(torch.Generator().manual_seed(11), 1, c, h, h, rounds, rolls)
    g = torch.Generator().manual_seed(11)
    e = torch.randn(c, h, h)
    seq = []
    for _ in range(rounds * rolls):
        seq += ac_loop(e, generator=g)[1]
    assert shifts.flatten().tolist() == seq
    assert shifts[..., 0].max() < 20 and shifts[..., 3].max() < 2


@pytest.mark.parametrize("lams", [(0.065, 20.0), (0.05, 0.0), (0.0, 10.0)])
def test_regularize_equals_reference_loop(lams, rng):
    lam_kl, lam_ac = lams
    e = torch.randn(1, 4, 16, 16, generator=rng) * 1.3
    ref = torch.randn(1, 4, 16, 16, generator=rng)
    out = R.regularize(e, ref, torch.Generator().manual_seed(5), lambda_kl=lam_kl, lambda_ac=lam_ac, rounds=3, rolls=4)
    want = official.regularize(e[0], ref[0], torch.Generator().manual_seed(5), lam_kl, lam_ac, 3, 4)
    assert not torch.equal(out[0], e[0])
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)


def test_regularize_runs_under_inference_mode(rng):
    e, ref = torch.randn(2, 4, 16, 16, generator=rng), torch.randn(2, 4, 16, 16, generator=rng)
    want = R.regularize(e, ref, torch.Generator().manual_seed(3), lambda_kl=0.05, lambda_ac=10.0, rounds=2, rolls=2)
    with torch.inference_mode():
        got = R.regularize(e.clone(), ref.clone(), torch.Generator().manual_seed(3), lambda_kl=0.05, lambda_ac=10.0,
                           rounds=2, rolls=2)
    assert torch.equal(got, want)


def test_regularize_batch_equals_per_image(rng):
    e = torch.randn(3, 4, 16, 8, generator=rng)
    ref = torch.randn(3, 4, 16, 8, generator=rng)
    shifts = R.draw_shifts(rng, 3, 4, 16, 8, 2, 3)
    out = R.regularize(e, ref, lambda_kl=0.06, lambda_ac=20.0, rounds=2, rolls=3, shifts=shifts)
    for b in range(3):
        one = R.regularize(e[b:b + 1], ref[b:b + 1], lambda_kl=0.06, lambda_ac=20.0, rounds=2, rolls=3,
                           shifts=shifts[:, :, b:b + 1])
        torch.testing.assert_close(out[b:b + 1], one, rtol=1e-6, atol=1e-7)


def test_regularize_off_is_identity_and_draws_nothing(rng):
    e = torch.randn(1, 4, 8, 8, generator=rng)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert R.regularize(e, e, g, lambda_kl=0.1, lambda_ac=10.0, rounds=0) is e
    R.regularize(e, torch.randn_like(e), g, lambda_kl=0.1, lambda_ac=0.0, rounds=2)
    assert torch.equal(g.get_state(), state)


def test_regularizer_bad_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        R.patch_kl_loss(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="differs"):
        R.patch_kl_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 4))
    with pytest.raises(ValueError, match="too small"):
        R.pyramid_heights(1, 1)
    with pytest.raises(ValueError, match="shifts must have shape"):
        R.autocorr_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        R.regularize(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), lambda_kl=-1.0, lambda_ac=0.0)
