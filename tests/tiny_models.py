"""Tiny random-weight diffusers UNets and VAEs, saved in real diffusers format, for tests.

Stable helpers (other test files import them):
    tiny_unet_config(kind)            kwargs for diffusers' UNet2DConditionModel; kind in
                                      {"sd1", "sd2", "sdxl", "lcm"}
    tiny_vae_config(kind="sd")        kwargs for diffusers' AutoencoderKL; kind in {"sd", "sdxl", "old"}
    make_tiny_unet(kind, seed=0)      the diffusers model, every parameter randomised
    save_tiny_unet(path, kind, ...)   make + save_pretrained(path) → the fp32 diffusers model
    save_tiny_vae(path, kind, ...)    the same for the VAE
    unet_inputs(kind, batch=2, ...)   random (x, t, context, extra kwargs) for a tiny UNet
    make_cache(cache, repo_id, folder) a Hugging Face cache entry (offline hub) holding `folder`
    FakeHub(repos, cache)             an online hub served from local folders that records what is fetched

diffusers is imported lazily: it is a test-only oracle.
"""
from __future__ import annotations

import torch

TINY_POOLED_DIM = 32          # SDXL-like: pooled text embedding size
TINY_TIME_ID_DIM = 8          # SDXL-like: per-time-id sinusoid size


def tiny_unet_config(kind: str) -> dict:
    if kind in ("sd1", "lcm"):
        cfg = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, sample_size=8)
        if kind == "lcm":
            cfg["time_cond_proj_dim"] = 16
        return cfg
    if kind == "sd2":
        return dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=48,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, sample_size=8)
    if kind == "sdxl":
        return dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=64,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    transformer_layers_per_block=(1, 2), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_ID_DIM,
                    projection_class_embeddings_input_dim=TINY_POOLED_DIM + 6 * TINY_TIME_ID_DIM, sample_size=8)
    raise ValueError(f"unknown tiny UNet kind {kind!r}")


def tiny_vae_config(kind: str = "sd") -> dict:
    cfg = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               sample_size=16)
    if kind == "sdxl":
        cfg.update(scaling_factor=0.13025, force_upcast=True)
    elif kind not in ("sd", "old"):
        raise ValueError(f"unknown tiny VAE kind {kind!r}")
    return cfg


def _randomise(model, seed: int, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(cls, cfg: dict, seed: int):
    with torch.random.fork_rng():          # deterministic init without touching the caller's RNG
        torch.manual_seed(seed)
        model = cls(**cfg)
    return _randomise(model, seed)


def make_tiny_unet(kind: str, seed: int = 0, **overrides):
    """Same kind, seed and overrides → the same weights."""
    from diffusers import UNet2DConditionModel
    return _build(UNet2DConditionModel, {**tiny_unet_config(kind), **overrides}, seed)


def make_tiny_vae(kind: str = "sd", seed: int = 0, **overrides):
    from diffusers import AutoencoderKL
    return _build(AutoencoderKL, {**tiny_vae_config(kind), **overrides}, seed)


def _save(model, path, variant, dtype, max_shard_size):
    kw = {"variant": variant}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    if dtype is not None and dtype != torch.float32:
        half = type(model).from_config(model.config).to(dtype)
        half.load_state_dict(model.state_dict())
        half.save_pretrained(path, **kw)
    else:
        model.save_pretrained(path, **kw)


def save_tiny_unet(path, kind: str, *, seed: int = 0, variant: str | None = None, dtype=None,
                   max_shard_size=None, **overrides):
    """Save a tiny diffusers UNet to `path` (a model folder); returns the fp32 diffusers model."""
    model = make_tiny_unet(kind, seed, **overrides)
    _save(model, path, variant, dtype, max_shard_size)
    return model


def save_tiny_vae(path, kind: str = "sd", *, seed: int = 0, variant: str | None = None, dtype=None,
                  max_shard_size=None, **overrides):
    """Save a tiny diffusers AutoencoderKL to `path`; kind "old" rewrites the attention weights with the
    legacy query/key/value/proj_attn names, as [C, C, 1, 1] convs. Returns the fp32 diffusers model."""
    model = make_tiny_vae(kind, seed, **overrides)
    _save(model, path, variant, dtype, max_shard_size)
    if kind == "old":
        from pathlib import Path

        from safetensors.torch import load_file, save_file
        f = next(Path(path).glob("diffusion_pytorch_model*.safetensors"))
        sd = load_file(f)
        new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for k in list(sd):
            for a, b in new.items():
                if ".attentions." in k and f".{a}." in k:
                    v = sd.pop(k)   # legacy files also stored these as 1x1 conv weights
                    sd[k.replace(f".{a}.", f".{b}.")] = v[:, :, None, None] if v.ndim == 2 else v
        save_file(sd, f)
    return model


def unet_inputs(kind: str, batch: int = 2, size: int = 8, tokens: int = 7, seed: int = 0, dtype=torch.float32):
    """(x, t, context, extra) with per-sample float timesteps; extra has SDXL/LCM conditioning."""
    cfg = tiny_unet_config(kind)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g) * 999
    context = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g, dtype=dtype)
    extra = {}
    if kind == "sdxl":
        extra["text_embeds"] = torch.randn(batch, TINY_POOLED_DIM, generator=g, dtype=dtype)
        rows = [[512.0, 512, 0, 0, 512, 512], [768.0, 1024, 16, 32, 512, 640]]
        extra["time_ids"] = torch.tensor([rows[i % 2] for i in range(batch)], dtype=dtype)
    if kind == "lcm":
        extra["timestep_cond"] = torch.randn(batch, cfg["time_cond_proj_dim"], generator=g, dtype=dtype)
    return x, t, context, extra


def make_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a Hugging Face cache entry for `repo_id` whose snapshot is a copy of `folder`;
    returns the snapshot folder."""
    import shutil
    from pathlib import Path
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


class FakeHub:
    """An online hub without network, for tests: repo ids served from local folders.

    `list_repo_files` lists a repo's folder; `snapshot_download` "downloads" the files matching
    `allow_patterns` into a fresh cache (copies them) and records each in `fetched`, so that a
    test sees exactly what a loader fetched: nothing else is on disk for the loader to read.
    `install(monkeypatch)` switches huggingface_hub online and patches both functions.
    """

    def __init__(self, repos: dict, cache):
        from pathlib import Path
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.cache = Path(cache)
        self.fetched: list[str] = []

    def install(self, monkeypatch):
        import huggingface_hub
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        return self

    def _repo(self, repo_id):
        from types import SimpleNamespace

        from huggingface_hub import errors
        if repo_id not in self.repos:
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise errors.RepositoryNotFoundError(f"404: {repo_id} not found", response=response)
        return self.repos[repo_id]

    def list_repo_files(self, repo_id, revision=None, **kw):
        root = self._repo(repo_id)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id, allow_patterns=None, local_files_only=False, **kw):
        import fnmatch
        import shutil
        root, snap = self._repo(repo_id), self.cache / repo_id.replace("/", "--")
        snap.mkdir(parents=True, exist_ok=True)
        if not local_files_only:
            for name in self.list_repo_files(repo_id):
                if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                    (snap / name).parent.mkdir(parents=True, exist_ok=True)
                    if not (snap / name).exists():
                        shutil.copyfile(root / name, snap / name)
                        self.fetched.append(name)
        return str(snap)
