"""Train the demo flow model: `python -m renoise.demo.train_flow --out DIR --minutes 50`.

Only the SD3 transformer learns; the demo model's VAE and text encoder are reused frozen
(`flow_model.write_flow_folder`). The training scenes (seeds [0, pool)) are rendered and encoded
once with the shipped (fp16) demo VAE; each step draws a fresh posterior sample
z0 = (mean + std·n) · scaling_factor and trains the rectified-flow objective

    σ ~ logit-normal(0, 1)  (sigmoid of a standard normal, SD3's choice)
    x_σ = (1 − σ) z0 + σ ε,  target v = ε − z0,  loss = ‖model(x_σ, 1000σ, c) − v‖²

with captions dropped to "" 10% of the time (for classifier-free guidance). The conditioning is
computed by the same `encode_flow_prompts` that sampling uses, on the folder as it will ship.
AdamW, linear warm-up then cosine decay over the wall-clock budget (`--minutes`: the schedule's
progress is elapsed time / budget), EMA of the weights; a checkpoint every `--checkpoint-minutes`
in `--work`, from which a rerun resumes. The result is the diffusers folder plus training.json,
losses.png and samples.png.
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

from . import HELD_OUT
from .flow_model import MAX_SEQUENCE_LENGTH, TRANSFORMER, init_transformer, write_flow_folder
from .scenes import random_scene
from .train import TRAIN_SEED_OFFSET, _ema_update, _smooth, encode_pool, save_sample_sheet

__all__ = ["logit_normal_sigmas", "flow_targets", "main"]


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """σ = sigmoid(mean + std·N(0, 1)), [n] in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_targets(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor):
    """(x_σ = (1 − σ) z0 + σ ε, v = ε − z0) for σ [B]."""
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * z0 + s * eps, eps - z0


def _lr(progress: float, step: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, progress)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def _blank_folder(folder: Path, seed: int) -> Path:
    """The folder as it will ship, with an initial transformer (its conditioning path is frozen)."""
    from ..models.mmdit import SD3Transformer
    torch.manual_seed(seed)
    return write_flow_folder(folder, init_transformer(SD3Transformer(TRANSFORMER), seed), dtype=torch.float16)


def plot_losses(path, losses):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(6, 3.6))
    ax.plot(_smooth([r["loss"] for r in losses]))
    ax.set(title="rectified-flow loss ‖v̂ − (ε − x0)‖²", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def sample_grid(folder, path, n: int = 16, steps: int = 20, guidance: float = 4.0, seed: int = 0):
    """Held-out captions HELD_OUT..HELD_OUT+n generated from the saved folder, as [target | generated] pairs."""
    from ..flow import generate_flow
    from ..models import load_pipeline

    pipe = load_pipeline(folder)
    pipe.max_sequence_length = MAX_SEQUENCE_LENGTH
    scenes = [random_scene(HELD_OUT + i) for i in range(n)]
    z = generate_flow(pipe, [s.caption for s in scenes], num_steps=steps, guidance_scale=guidance, size=(128, 128),
                      generator=torch.Generator().manual_seed(seed))
    imgs = pipe.vae.decode(z / pipe.vae.scaling_factor + pipe.vae.shift_factor)
    save_sample_sheet(imgs, path)
    return [s.caption for s in scenes]


def main(argv=None):
    from ..models import load_pipeline
    from ..models.flow_pipeline import encode_flow_prompts
    from ..models.vae import AutoencoderKL  # noqa: F401  (the pipeline's VAE class)

    p = argparse.ArgumentParser(prog="python -m renoise.demo.train_flow", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write the trained StableDiffusion3Pipeline folder to")
    p.add_argument("--work", default=None, help="pool and checkpoints (default: OUT/../demo-flow-work)")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the training loop")
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--pool", type=int, default=8000, help="training scenes encoded once with the frozen VAE")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop", type=float, default=0.1, help="fraction of captions replaced by '' (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a 2-core machine shared with other jobs, 2 threads ran a "
                        "step 13× slower than 1, waiting on each other)")
    p.add_argument("--no-samples", action="store_true", help="skip samples.png (smoke tests)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    work = Path(a.work) if a.work else out.parent / "demo-flow-work"
    work.mkdir(parents=True, exist_ok=True)
    budget = a.minutes * 60

    folder = _blank_folder(work / "blank", a.seed)
    pipe = load_pipeline(folder)                        # frozen VAE and text encoders exactly as shipped
    pipe.max_sequence_length = MAX_SEQUENCE_LENGTH
    vae, scaling = pipe.vae, pipe.vae.scaling_factor
    for m in pipe.modules().values():
        m.requires_grad_(False)

    pool_ckpt = work / f"pool-{a.pool}.pt"
    if pool_ckpt.is_file():
        saved = torch.load(pool_ckpt)
        means, logvars, encode_seconds = saved["means"], saved["logvars"], saved["seconds"]
    else:
        t = time.time()
        means, logvars = encode_pool(vae, range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + a.pool))
        encode_seconds = time.time() - t
        torch.save({"means": means, "logvars": logvars, "seconds": encode_seconds}, pool_ckpt)
    captions = [random_scene(s).caption for s in range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + a.pool)]

    model = pipe.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(a.seed + 1)
    step, elapsed, losses = 0, 0.0, []
    ckpt = work / "flow-ckpt.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        step, elapsed, losses = saved["step"], saved["elapsed"], saved["losses"]
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)

    def save_ckpt():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "elapsed": elapsed, "losses": losses}, work / "tmp.pt")
        (work / "tmp.pt").replace(ckpt)

    start, last_ckpt = time.time() - elapsed, time.time()
    while elapsed < budget:
        for g in opt.param_groups:
            g["lr"] = _lr(elapsed / budget, step, a.lr, a.warmup)
        idx = torch.randint(0, len(means), (a.batch,), generator=gen)
        z0 = (means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(means[idx].shape, generator=gen)) * scaling
        eps = torch.randn(z0.shape, generator=gen)
        sigma = logit_normal_sigmas(a.batch, gen)
        xt, v = flow_targets(z0, eps, sigma)
        prompts = ["" if r < a.drop else captions[i] for r, i in
                   zip(torch.rand(a.batch, generator=gen).tolist(), idx.tolist())]
        context, pooled = encode_flow_prompts(pipe, prompts)
        loss = (model(xt, 1000 * sigma, context, pooled) - v).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, min(a.ema, (1 + step) / (10 + step)))
        step += 1
        elapsed = time.time() - start
        losses.append({"step": step, "loss": loss.item(), "seconds": elapsed})
        if step % 20 == 0:
            recent = np.mean([r["loss"] for r in losses[-100:]])
            print(f"step {step}  {elapsed / 60:.1f} min  loss {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}",
                  flush=True)
        if time.time() - last_ckpt > a.checkpoint_minutes * 60:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()

    readme = Path(__file__).with_name("FLOW_MODEL_CARD.md")
    write_flow_folder(out, ema, readme=readme.read_text() if readme.is_file() else None)
    n_params = sum(p.numel() for p in ema.parameters())
    log = {"threads": torch.get_num_threads(), "args": vars(a), "encode_seconds": encode_seconds,
           "train_seconds": elapsed, "steps": step, "transformer_parameters": n_params,
           "final_loss": float(np.mean([r["loss"] for r in losses[-200:]]))}
    plot_losses(out / "losses.png", losses)
    (work / "losses.json").write_text(json.dumps(losses))
    if not a.no_samples:
        log["sample_captions"] = sample_grid(out, out / "samples.png")
    (out / "training.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "sample_captions"}, indent=1), flush=True)
    return out


if __name__ == "__main__":
    main()
