"""One (image, method) pair of `renoise eval`: invert, reconstruct, edit, and measure.

    row = measure(editor, item, x, mask, seed=..., edit_guidance=1.0, lpips=scorer, posterior="mean")

The row holds image PSNR/SSIM (and LPIPS when its weights are local) of the reconstruction,
latent PSNR/SSIM/RMSE, model calls (a UNet's or a flow transformer's) and seconds of each part, the
inversion's cost (model evaluations at the image batch, backward passes, call-equivalents), the peak
memory, and the fixed-point residuals of every inversion step (final and per iteration; the
contraction estimate where the inversion reports one). With an edit prompt: the edit's calls and
seconds, and where a mask is known the background PSNR (outside the mask grown by 3 px) and, for
items with a target colour (demo scenes, the built sets, a folder's `target_colour`), whether the
masked shape took it (`edit_success`; `edit_colour`: the dominant palette colour found, `target_colour`:
the one asked). Image PSNR is in [0, 1] units (data range 1), as the paper reports it.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
import zlib

import torch
import torch.nn.functional as F

from .. import metrics
from ..pipeline import decode_latents

__all__ = ["measure", "pair_seed", "LPIPSScorer", "background_psnr", "GROW"]

GROW = 3        # px the edit mask is grown by before the background PSNR is taken


def pair_seed(seed: int, image_id: str) -> int:
    """The generator seed of an image: the same for every method, rank and world size."""
    return (seed * 1_000_003 + zlib.crc32(image_id.encode())) % (2 ** 63)


class LPIPSScorer:
    """LPIPS with the network loaded once, or None with the reason when the weights are not local."""

    def __init__(self, device):
        try:
            self.net = metrics.LPIPS.from_files().to(device)
            self.note = None
        except metrics.LPIPSWeightsMissing as e:
            self.net, self.note = None, str(e)

    def __call__(self, x, y):
        if self.net is None or min(x.shape[-2:]) < 32:
            return None
        return float(self.net(x, y)[0])


def background_psnr(edited, source, mask, grow: int = GROW) -> float:
    """PSNR in [0, 1] units of the edit against the source outside the mask grown by `grow` px."""
    region = F.max_pool2d((mask > 0.01).float()[None, None], 2 * grow + 1, 1, grow)[0, 0] > 0
    keep = ~region.to(edited.device)
    if not bool(keep.any()):
        return float("nan")
    mse = ((edited - source)[0][:, keep] / 2).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss            # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "process_max_rss"


def _floats(t: torch.Tensor) -> list:
    return [float(v) for v in t.detach().float().cpu().reshape(-1)]


def _residuals(result) -> dict:
    per_iteration = [_floats(r[:, 0]) for r in result.residuals]         # per step, [calls]
    out = {"final_residual": [r[-1] for r in per_iteration], "residuals": per_iteration,
           "timesteps": [int(t) for t in result.timesteps.flip(0)]}     # inversion order, like the residuals
    solver = getattr(getattr(result, "plan", None), "solver", "fixed-point")
    if hasattr(result, "convergence") and solver == "fixed-point":   # ReNoise plans; peers and anchors have no budget
        conv = result.convergence()
        out["budget_used"] = conv["budget"][0]
        out["not_converged"] = [{k: v for k, v in c.items() if k != "sample"} for c in conv["not_converged"]]
    contraction = getattr(result, "contraction", None)
    if contraction:
        out["contraction"] = [float(c.reshape(-1)[0]) for c in contraction]
    return out


def _costs(editor, inv) -> dict:
    """The inversion's cost: UNet evaluations at the image batch (a CFG call counts 2), backward
    passes, and call-equivalents = evaluations + r · backward passes, r the backward's measured cost
    in forward calls (renoise.peers.cost; measured by the editors that differentiate)."""
    extra = getattr(inv, "extra", None) or {}
    evals = extra.get("unet_evals", inv.result.model_calls)
    backward = extra.get("backward", 0)
    ratio = getattr(editor, "backward_ratio", None)
    out = {"evals_invert": evals, "backward_invert": backward,
           "cost_invert": float(evals) + (ratio or 0.0) * backward}
    if ratio is not None:
        out["backward_ratio"] = ratio
    return out


def _network(pipe):
    """The denoising network: a UNet pipeline's UNet, a flow pipeline's (SD3 / FLUX.1) transformer."""
    from ..pipeline import family_of
    return family_of(pipe).network


@torch.no_grad()
def measure(editor, item, x, mask, *, seed: int, edit_guidance: float = 1.0, lpips=None,
            posterior: str = "mean", control=None, mask_edits: bool = False,
            paste_back: bool = False) -> tuple[dict, dict]:
    """Run one pair. Returns (row, images): images holds "reconstruction" and maybe "edit" [1, 3, H, W]
    (and "blend_mask", the edit's latent mask drawn at image size, with an editing mode that has one)
    and the inversion ("inversion") for the caller to save. control: a renoise.editing.EditControl
    (None: the prompt swap); mask_edits: the image's mask is the edit's user mask; paste_back: outside
    the edit's mask the edit is x's pixels (renoise.editing.paste_back; the decoded edit's background
    PSNR stays in the row as edit_background_psnr_decoded)."""
    pipe = editor.pipe
    device = next(_network(pipe).parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x = x.to(device)
    gen = torch.Generator(device).manual_seed(pair_seed(seed, item.id))
    t0 = time.perf_counter()
    inv = editor.invert(x, item.prompt, generator=gen, sample_posterior=posterior == "sample")
    _sync(device)
    t1 = time.perf_counter()
    z, den = editor.reconstruct_latents(inv)
    recon = decode_latents(pipe, z)
    _sync(device)
    t2 = time.perf_counter()
    latent = metrics.latent_metrics(z, inv.z0.to(z.device))
    row = {"psnr": float(metrics.psnr(recon, x)[0]), "ssim": float(metrics.ssim(recon, x)[0]),
           "lpips": lpips(recon, x) if lpips is not None else None,
           "latent_psnr": float(latent["psnr"][0]), "latent_ssim": float(latent["ssim"][0]),
           "latent_rmse": float(latent["rmse"][0]),
           "calls_invert": inv.result.model_calls, "calls_reconstruct": den.calls,
           "seconds_invert": t1 - t0, "seconds_reconstruct": t2 - t1}
    row.update(_costs(editor, inv))
    images = {"reconstruction": recon, "inversion": inv}
    if item.edit_prompt:
        if mask_edits:
            if mask is None:
                raise ValueError(f"{item.id} has no mask for --mask-edits")
            from ..editing import EditControl
            control = dataclasses.replace(control or EditControl(), mask=mask)
        z_edit, den_edit = editor.edit_latents(inv, item.edit_prompt, edit_guidance_scale=edit_guidance,
                                               control=control)
        edited = decode_latents(pipe, z_edit)
        decoded = edited
        if paste_back:
            from ..editing import edit_mask, paste_back as paste
            edited = paste(edited, x.to(edited), edit_mask(control, den_edit))
        _sync(device)
        row.update(edit_prompt=item.edit_prompt, calls_edit=den_edit.calls, seconds_edit=time.perf_counter() - t2,
                   edit_mode="swap" if control is None else control.mode)
        images["edit"] = edited
        blend = getattr(den_edit, "mask", None)
        if blend is not None:
            images["blend_mask"] = F.interpolate(blend[:1].float(), size=edited.shape[-2:]).expand(-1, 3, -1, -1) * 2 - 1
            row["blend_fraction"] = float(blend[:1].mean())
        if mask is not None:
            row["edit_background_psnr"] = background_psnr(edited, x, mask)
            if paste_back:
                row["edit_background_psnr_decoded"] = background_psnr(decoded, x, mask)
        if item.target_colour is not None:
            from ..demo.checks import COVERED, dominant_colour
            from .data import as_numpy01
            got = dominant_colour(as_numpy01(edited), mask.cpu().numpy() > COVERED)
            row.update(edit_colour=got, edit_success=got == item.target_colour, target_colour=item.target_colour)
    row["seconds_total"] = time.perf_counter() - t0
    row["peak_memory_mib"], row["memory_kind"] = _peak_memory_mib(device)
    row.update(_residuals(inv.result))
    return row, images
