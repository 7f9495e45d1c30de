"""Train the demo model from scratch on rendered scenes: `python -m renoise.demo.train --out DIR`.

Two stages, each resumable from its checkpoint in `--work`:

1. VAE: L1 + MSE reconstruction of random 64 px crops of rendered scenes, KL weight 1e-6 per
   latent element; afterwards `scaling_factor = 1 / std` of the posterior means of the pool.
2. UNet and text encoder together: ε-prediction MSE with Min-SNR-5 weighting on a pool of
   pre-encoded scenes (a fresh posterior sample each step), captions dropped to "" 10% of the
   time (for classifier-free guidance), AdamW with warm-up and cosine decay, EMA of the weights.

Everything is seeded: the same command gives the same weights on the same machine. The result is
the diffusers folder of `model.write_folder` plus `training.json`, `losses.png` and `samples.png`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clip import CLIPTextModel
from ..models.tokenizer import load_tokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..schedules import Schedule
from . import model as demo_model
from . import HELD_OUT
from .scenes import random_scene, render

__all__ = ["render_batch", "train_vae", "encode_pool", "train_unet", "main"]

TRAIN_SEED_OFFSET = 0           # training scenes use seeds [0, pool); held-out ones start at demo.HELD_OUT


def render_batch(seeds) -> torch.Tensor:
    """Rendered scenes [B, 3, 128, 128] in [-1, 1]."""
    return torch.from_numpy(np.stack([render(random_scene(int(s))) for s in seeds])) * 2 - 1


def _lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def _progress(steps: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm
    return tqdm(total=steps, desc=desc, disable=quiet, dynamic_ncols=True, mininterval=2.0)


def train_vae(steps: int, *, batch: int = 16, crop: int = 64, lr: float = 1e-3, images: int = 8000,
              seed: int = 0, kl_weight: float = 1e-6, quiet: bool = False, state: dict | None = None):
    """Train the demo AutoencoderKL. Returns (vae, losses per step)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(demo_model.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pool = render_batch(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + images))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress(steps, "VAE", quiet)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=min(100, steps))
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        top, left = (torch.randint(0, pool.shape[-1] - crop + 1, (2,), generator=gen) // 8 * 8).tolist()
        x = pool[idx, :, top:top + crop, left:left + crop]
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        y = vae.decode(z)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        mse = (y.detach().clamp(-1, 1) - x).pow(2).mean().item() / 4      # in [0, 1] units
        losses.append({"step": step, "loss": loss.item(), "psnr": -10 * math.log10(max(mse, 1e-10))})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}", psnr=f"{losses[-1]['psnr']:.1f}")
    bar.close()
    return vae.eval(), losses


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, seeds, batch: int = 64, quiet: bool = False):
    """Posterior (mean, logvar) of the rendered scenes with these seeds, raw (unscaled) latents."""
    means, logvars = [], []
    seeds = list(seeds)
    bar = _progress(len(seeds), "encode", quiet)
    for i in range(0, len(seeds), batch):
        m, lv = vae.encode(render_batch(seeds[i:i + batch]))
        means.append(m)
        logvars.append(lv)
        bar.update(len(seeds[i:i + batch]))
    bar.close()
    return torch.cat(means), torch.cat(logvars)


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(means: torch.Tensor, logvars: torch.Tensor, captions: list[str], steps: int, *,
               scaling_factor: float, batch: int = 64, lr: float = 1e-3, seed: int = 0, drop: float = 0.1,
               ema_decay: float = 0.999, min_snr: float = 5.0, quiet: bool = False, tokenizer_dir=None):
    """Train UNet and text encoder together on pre-encoded latents. Returns (ema_unet, ema_text, losses)."""
    import tempfile

    torch.manual_seed(seed)
    unet, text = UNet(demo_model.UNET), CLIPTextModel(demo_model.text_config())
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(demo_model.write_tokenizer(tokenizer_dir or Path(tmp) / "tok"), subfolder=None)
        ids = tok(captions)
        empty = tok([""])[0]
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    abar = Schedule.create().alphas_cumprod.float()
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=min_snr) / snr                       # Min-SNR-γ for ε-prediction
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    bar = _progress(steps, "UNet", quiet)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=min(200, steps))
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        z0 = (means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(means[idx].shape, generator=gen)) \
            * scaling_factor
        t = torch.randint(0, len(abar), (batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        tokens = ids[idx].clone()
        tokens[torch.rand(batch, generator=gen) < drop] = empty
        context = text(tokens).last_hidden_state
        err = (unet(zt, t, context) - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        losses.append({"step": step, "loss": loss.item(), "mse": err.mean().item()})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
    bar.close()
    return ema_unet, ema_text, losses


def _smooth(v, n=50):
    v = np.asarray(v, float)
    if len(v) < n:
        return v
    return np.convolve(v, np.ones(n) / n, mode="valid")


def plot_losses(path, vae_losses, unet_losses):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    ax[0].plot(_smooth([r["loss"] for r in vae_losses]))
    ax[0].set(title="VAE loss (L1 + MSE)", xlabel="step", yscale="log")
    ax[1].plot(_smooth([r["psnr"] for r in vae_losses]))
    ax[1].set(title="VAE crop PSNR (dB)", xlabel="step")
    ax[2].plot(_smooth([r["loss"] for r in unet_losses]), label="Min-SNR weighted")
    ax[2].plot(_smooth([r["mse"] for r in unet_losses]), label="ε MSE")
    ax[2].set(title="UNet loss", xlabel="step", yscale="log")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def sample_grid(folder, path, n: int = 16, steps: int = 25, guidance: float = 4.0, seed: int = 0):
    """Generate the held-out captions HELD_OUT..HELD_OUT+n from the saved folder; save
    [rendered target | generated] pairs as one PNG. Returns the captions."""
    from ..generate import generate
    from ..models import load_pipeline

    pipe = load_pipeline(folder)
    scenes = [random_scene(HELD_OUT + i) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    imgs = generate(pipe, [s.caption for s in scenes], num_steps=steps, guidance_scale=guidance, generator=gen)
    save_sample_sheet(imgs, path)
    return [s.caption for s in scenes]


def save_sample_sheet(imgs, path) -> None:
    """imgs [n, 3, 128, 128] generated for the held-out captions HELD_OUT..HELD_OUT+n: one PNG of
    [rendered target | generated] pairs, four to a row."""
    from ..images import save_image
    n = imgs.shape[0]
    targets = render_batch([HELD_OUT + i for i in range(n)])
    pairs = torch.cat([targets, imgs.clamp(-1, 1)], dim=3)                # [n, 3, 128, 256]
    rows = [torch.cat(list(pairs[i:i + 4]), dim=2) for i in range(0, n, 4)]
    save_image(torch.cat(rows, dim=1)[None], path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m renoise.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the trained diffusers pipeline to")
    p.add_argument("--work", default=None, help="checkpoints of each stage (default: OUT/../demo-work)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=3500)
    p.add_argument("--pool", type=int, default=16000, help="training scenes encoded for the UNet stage")
    p.add_argument("--vae-images", type=int, default=8000, help="training scenes for the VAE stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    work = Path(a.work) if a.work else out.parent / "demo-work"
    work.mkdir(parents=True, exist_ok=True)
    log = {"threads": torch.get_num_threads(), "args": vars(a)}
    t0 = time.time()

    vae_ckpt = work / "vae.pt"
    if vae_ckpt.is_file():
        saved = torch.load(vae_ckpt, weights_only=False)
        vae = AutoencoderKL(saved["config"])
        vae.load_state_dict(saved["state"])
        vae_losses, log["vae_seconds"] = saved["losses"], saved["seconds"]
    else:
        vae, vae_losses = train_vae(a.vae_steps, images=a.vae_images, seed=a.seed, quiet=a.quiet)
        log["vae_seconds"] = time.time() - t0
        torch.save({"config": vae.config, "state": vae.state_dict(), "losses": vae_losses,
                    "seconds": log["vae_seconds"]}, vae_ckpt)

    pool_ckpt = work / "pool.pt"
    t1 = time.time()
    if pool_ckpt.is_file():
        saved = torch.load(pool_ckpt)
        means, logvars, log["encode_seconds"] = saved["means"], saved["logvars"], saved["seconds"]
    else:
        means, logvars = encode_pool(vae, range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + a.pool), quiet=a.quiet)
        log["encode_seconds"] = time.time() - t1
        torch.save({"means": means, "logvars": logvars, "seconds": log["encode_seconds"]}, pool_ckpt)
    scaling = float(1.0 / means.std())
    vae.config = __import__("dataclasses").replace(vae.config, scaling_factor=round(scaling, 5))
    log["scaling_factor"] = vae.config.scaling_factor
    captions = [random_scene(s).caption for s in range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + a.pool)]

    t2 = time.time()
    unet, text, unet_losses = train_unet(means, logvars, captions, a.unet_steps, scaling_factor=vae.config.scaling_factor,
                                         batch=a.batch, seed=a.seed, quiet=a.quiet)
    log["unet_seconds"] = time.time() - t2
    log["total_seconds"] = log["vae_seconds"] + log["encode_seconds"] + log["unet_seconds"]
    log["final"] = {"vae_loss": float(np.mean([r["loss"] for r in vae_losses[-100:]])),
                    "vae_crop_psnr": float(np.mean([r["psnr"] for r in vae_losses[-100:]])),
                    "unet_loss": float(np.mean([r["loss"] for r in unet_losses[-200:]])),
                    "unet_eps_mse": float(np.mean([r["mse"] for r in unet_losses[-200:]]))}
    readme = (Path(__file__).with_name("MODEL_CARD.md").read_text()
              if Path(__file__).with_name("MODEL_CARD.md").is_file() else None)
    write_folder = demo_model.write_folder(out, unet, vae, text, readme=readme)
    (work / "losses.json").write_text(json.dumps({"vae": vae_losses, "unet": unet_losses}))
    plot_losses(out / "losses.png", vae_losses, unet_losses)
    log["sample_captions"] = sample_grid(out, out / "samples.png")
    (out / "training.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "sample_captions"}, indent=1))
    return write_folder


if __name__ == "__main__":
    main()
