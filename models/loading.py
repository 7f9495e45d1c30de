"""Loading UNet / VAE weights from diffusers folders, hub ids and checkpoint files.

    load_unet(source, dtype=..., device=...)   source: a diffusers pipeline folder, a model folder,
                                               a hub id ("org/name"), or a weights file + config=
    load_vae(source, ...)                       the same for the autoencoder

The model is built on the meta device (no memory, no random init), the checkpoint's key names
and shapes are checked against it from the file header before any data is read, and the weights
are assigned to the module straight from the memory-mapped file (`read_safetensors`): a view of the
map when dtype and device match the file's (nothing read until used), else one conversion into the
final dtype on the final device. No second copy of the weights ever exists. Safetensors only, unless
the caller passes allow_pickle=True, in which case `.bin` / `.ckpt` files are read with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import mmap
import re
from pathlib import Path

import torch

from .configs import UNetConfig, VAEConfig, read_config, unet_config, vae_config
from .unet import UNet
from .vae import AutoencoderKL


def component_present(index: dict, name: str) -> bool:
    """Whether a pipeline's model_index.json lists component `name` (diffusers writes [null, null] for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model."""


_PROGRESS = contextvars.ContextVar("renoise_load_progress", default=None)


@contextlib.contextmanager
def load_progress(bar):
    """While active, weight reads report to `bar` (a tqdm, or anything with `total` and `update(n)`):
    each file adds its size in bytes to `bar.total`, each tensor read its bytes to `bar.update`."""
    token = _PROGRESS.set(bar)
    try:
        yield bar
    finally:
        _PROGRESS.reset(token)


def _progress_add(nbytes: int):
    bar = _PROGRESS.get()
    if bar is not None:
        bar.total = (bar.total or 0) + nbytes
    return bar


# ---------------------------------------------------------------- safetensors, read by hand

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def safetensors_header(path) -> dict[str, dict]:
    """`{name: {"dtype", "shape", "data_offsets"}}` of a .safetensors file, validated against its size.

    Layout: u64 little-endian header length n, n bytes of JSON, then the tensor bytes.
    """
    return _header(Path(path))[0]


def _header(path: Path) -> tuple[dict, int]:
    """The validated header and the byte offset where the data section starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes); it may be truncated")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; "
                                  "the file is truncated or not a safetensors file — download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: unreadable safetensors header; the file is corrupt") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        want = math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]].itemsize
        if end - start != want:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {info['shape']}")
        if end > data:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data "
                                  f"section but only {data} bytes are present — download the file again")
    return header, 8 + n


# A view of the map is used only where the tensor's bytes start on an ALIGN-byte boundary (every
# tensor of the usual safetensors files); others are copied into a fresh, aligned buffer. Misaligned
# weights make oneDNN/MKL take other code paths, whose results differ in the last bits: with this,
# the same weights give the same numbers whichever file they came from.
ALIGN = 16


def read_safetensors(path, *, dtype=None, device="cpu", keys=None, rename=None, fresh=()) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `keys`) into `dtype` (floating tensors only) on `device`.

    `fresh`: names always read into their own memory, the map's pages released (for tensors the
    caller will split or rebuild: a view would keep the pages resident after the parts are copied).

    The file is memory-mapped, privately (copy-on-write: writing to a tensor never changes the file).
    A tensor that keeps its dtype on the CPU is a view of the map (when aligned, see ALIGN), as
    safetensors' own loader gives: nothing is read until it is used, and the pages come from the
    kernel's file cache. Any other tensor goes from the map into its final buffer (one copy; for a
    GPU the bytes go over as they are and the dtype changes there), and the map's pages it used are
    released at once, so the resident memory stays near the weights' final size.
    """
    path = Path(path)
    header, offset = _header(path)
    absent = [k for k in (keys or ()) if k not in header]
    if absent:
        raise CheckpointError(f"{path.name} does not contain {absent[:10]}")
    names = sorted(header if keys is None else keys, key=lambda k: header[k]["data_offsets"][0])
    bar = _progress_add(sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names))
    device = torch.device(device)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name in names:
        info = header[name]
        lo, hi = offset + info["data_offsets"][0], offset + info["data_offsets"][1]
        src = _ST_DTYPES[info["dtype"]]
        want = dtype if (dtype is not None and src.is_floating_point) else src
        keep = want == src and device.type == "cpu" and name not in fresh   # a view of the map, if aligned
        mapped = False
        if hi == lo:
            t = torch.empty(0, dtype=src)
        elif lo % (ALIGN if keep else src.itemsize):           # a fresh buffer is aligned
            t = torch.frombuffer(mm, dtype=torch.uint8, count=hi - lo, offset=lo).clone().view(src)
        else:                        # its own storage on the map: tensors never share one (save_file, compile)
            t, mapped = torch.frombuffer(mm, dtype=src, count=(hi - lo) // src.itemsize, offset=lo), True
        t = t.reshape(info["shape"])
        if not keep:
            t = t.to(device).to(want)
            if mapped and t.device.type == "cpu" and t.dtype == src:
                t = t.clone()                                  # still the map's bytes (a `fresh` name): copy them out
            _release(mm, lo, hi)
        out[rename(name) if rename else name] = t
        if bar is not None:
            bar.update(hi - lo)
    return out


def _release(mm, lo, hi):
    """Drop the map's whole pages inside [lo, hi) from this process (they were only read)."""
    page = mmap.PAGESIZE
    first, last = -(-lo // page) * page, hi // page * page
    if last > first and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


# ---------------------------------------------------------------- any checkpoint file

def _index_map(index: Path) -> dict[str, Path]:
    """`{tensor name: shard path}` from a sharded checkpoint's index json."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError):
        raise CheckpointError(f"{index} is not a checkpoint index (no 'weight_map')") from None
    shards = {s: index.parent / s for s in set(weight_map.values())}
    for s, p in shards.items():
        if not p.is_file():
            raise CheckpointError(f"shard {s} listed in {index.name} is missing from {index.parent}")
    return {k: shards[s] for k, s in weight_map.items()}


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes from safetensors headers (file or index) without reading data; None for pickles."""
    path = Path(path)
    if path.name.endswith(".json"):
        by_shard = {}
        for k, shard in _index_map(path).items():
            by_shard.setdefault(shard, []).append(k)
        if not all(s.suffix == ".safetensors" for s in by_shard):
            return None
        out = {}
        for shard, ks in by_shard.items():
            h = safetensors_header(shard)
            for k in ks:
                if k not in h:
                    raise CheckpointError(f"{path.name} maps {k!r} to {shard.name}, which does not contain it")
                out[k] = tuple(h[k]["shape"])
        return out
    if path.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in safetensors_header(path).items()}
    return None


def load_state_dict(path, *, allow_pickle: bool = False, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint: `.safetensors`, a sharded `*.index.json`, or (opt-in) a pickle file.

    Floating tensors are cast to `dtype` when given. Pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`)
    can run code when unpickled; they are refused unless allow_pickle=True, and then read with
    `torch.load(weights_only=True)`. A `.ckpt` wrapping its weights in "state_dict" is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.name.endswith(".json"):
        by_shard = {}
        for k, shard in _index_map(path).items():
            by_shard.setdefault(shard, []).append(k)
        out = {}
        for shard, ks in by_shard.items():
            out.update(load_state_dict(shard, allow_pickle=allow_pickle, dtype=dtype, device=device)
                       if shard.suffix != ".safetensors" else
                       read_safetensors(shard, dtype=dtype, device=device, keys=ks))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path, dtype=dtype, device=device)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path.name} is a pickle checkpoint, which can execute code when loaded; renoise reads "
                "safetensors only by default. If you trust the file, pass allow_pickle=True (it is then "
                "loaded with torch.load(weights_only=True)), or convert it to .safetensors")
        bar = _progress_add(path.stat().st_size)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad pickle
            raise CheckpointError(f"could not read pickle checkpoint {path} with weights_only=True: {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(sd).__name__})")
        if bar is not None:
            bar.update(path.stat().st_size)
        return {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                for k, v in sd.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path.name}: unknown checkpoint format (expected .safetensors, an index .json, "
                          f"or with allow_pickle=True one of {PICKLE_SUFFIXES})")


def check_keys(expected: dict[str, tuple], got: dict[str, tuple], where: str, what: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key (up to 10 of each)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(got[k])} vs model {tuple(expected[k])}"
              for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:10]) + more)
    if problems:
        raise CheckpointError(f"{where} does not match the {what} config:\n  " + "\n  ".join(problems) +
                              "\nCheck that the config.json matches the weights (or the config= you passed).")


# ---------------------------------------------------------------- finding the files

HALF = (torch.float16, torch.bfloat16)


def weight_variants(variant: str | None, dtype=None) -> tuple:
    """The variants to look for, in order: the one asked for; with none asked and a half-precision
    dtype, "fp16" first and then the default files (what diffusers' variant="fp16" reads)."""
    if variant:
        return (variant,)
    return ("fp16", None) if dtype in HALF else (None,)


def weight_candidates(base: str, variants, allow_pickle: bool) -> list[str]:
    """Weights file names in order of preference: safetensors (single file, then a shard index)
    for each variant, then, only with allow_pickle, the `.bin` equivalents. diffusers names a variant
    index `{base}.safetensors.index.{variant}.json`."""
    out = []
    for ext in (".safetensors", ".bin") if allow_pickle else (".safetensors",):
        for variant in variants:
            v = f".{variant}" if variant else ""
            out += [f"{base}{v}{ext}", f"{base}{ext}.index{v}.json", f"{base}{v}{ext}.index.json"]
    return list(dict.fromkeys(out))


def find_weights(folder, *, variant: str | None = None, allow_pickle: bool = False,
                 base: str = "diffusion_pytorch_model", dtype=None) -> Path:
    """The weights file (or shard index) of a diffusers model folder: the first present of
    `weight_candidates` (variant=None with a half dtype: the fp16 files when present)."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    variants = weight_variants(variant, dtype)
    name = next((n for n in weight_candidates(base, variants, allow_pickle) if n in present), None)
    if name is not None:
        return folder / name
    pickles = [n for n in weight_candidates(base, variants, True) if ".bin" in n]
    if not allow_pickle and any(n in present for n in pickles):
        raise CheckpointError(
            f"{folder} has only a pickle checkpoint ({next(n for n in pickles if n in present)}); pickles can "
            "execute code when loaded. Pass allow_pickle=True if you trust it (read with weights_only=True)")
    hint = ""
    if variant is None and any(re.match(rf"{re.escape(base)}\.\w+\.safetensors$", n) for n in present):
        hint = " It has variant files: pass variant='fp16' (or the variant named in the file)."
    elif variant is not None:
        hint = f" (variant={variant!r}; pass variant=None for the default files)"
    raise CheckpointError(f"no {base} weights in {folder}; files there: {present}.{hint}")


def is_hub_id(source) -> bool:
    """'org/name' that is not a local path; a weights file name ('x/y.safetensors') never is one."""
    return (isinstance(source, str) and not Path(source).exists() and bool(_HUB_ID.match(source))
            and not source.endswith((".safetensors", *PICKLE_SUFFIXES)))


def resolve_folder(source, subfolder: str | None, *, class_name: str, what: str, variant: str | None = None,
                   allow_pickle: bool = False, base: str = "diffusion_pytorch_model", cache_dir=None,
                   revision: str | None = None, local_files_only: bool | None = None, dtype=None) -> Path:
    """The local folder holding a model's config.json and weights.

    `source` is a diffusers pipeline folder (the model in `subfolder`), a model folder, or a hub id;
    for a hub id only the config and the one weights file `find_weights` will read (and its shards)
    are fetched, or found in the local cache when offline.
    """
    if is_hub_id(source):
        source = _download(source, subfolder, variants=weight_variants(variant, dtype), allow_pickle=allow_pickle,
                           base=base, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only)
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{source!r} is neither an existing path nor a hub id of the form 'org/name'")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; pass its folder, or the file with config=... to give the architecture")
    if subfolder and (root / subfolder / "config.json").is_file():
        return root / subfolder
    if (root / "config.json").is_file() and read_config(root / "config.json").get("_class_name") == class_name:
        return root
    raise FileNotFoundError(
        f"no {what} in {root}: expected {root / (subfolder or '')} with a config.json "
        f"(_class_name {class_name!r}), as in a diffusers pipeline folder")


def _download(repo_id, subfolder, *, variants, allow_pickle, base, cache_dir, revision, local_files_only) -> Path:
    """Fetch just the needed files of a hub repo (or find them in the cache); returns the snapshot folder.

    From the repo's file listing: the config (in `subfolder`, else at the repo root: a single-model
    repo such as a VAE) and the first present of `weight_candidates`, never a second format or
    variant; then the shards a shard index lists.
    """
    kw = dict(cache_dir=cache_dir, revision=revision)
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    files = hub_files(repo_id, **kw)
    sub = f"{subfolder}/" if subfolder else ""
    pre = sub if sub + "config.json" in files else ""
    name = next((n for n in weight_candidates(base, variants, allow_pickle) if pre + n in files), None)
    root = hub_snapshot(repo_id, [pre + "config.json"] + ([pre + name] if name else []), **kw)
    if name and name.endswith(".json"):
        shards = sorted(set(json.loads((root / pre / name).read_text())["weight_map"].values()))
        root = hub_snapshot(repo_id, [pre + s for s in shards], **kw)
    return root


def hub_files(repo_id: str, **hub) -> set[str]:
    """The paths of the files in hub repo `repo_id`: listed by the hub, or, offline (or when the hub
    cannot be reached), those of the locally cached snapshot. `hub`: cache_dir, revision,
    local_files_only. Not available: FileNotFoundError saying why."""
    import huggingface_hub as hf
    from huggingface_hub import constants, errors

    if not (hub.get("local_files_only") or constants.HF_HUB_OFFLINE):
        try:
            return set(hf.list_repo_files(repo_id, revision=hub.get("revision")))
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
            raise FileNotFoundError(f"could not access hub repo {repo_id!r}: {e}") from None
        except Exception:  # noqa: BLE001 -- no network or the hub is down: use what the cache holds
            pass
    root = hub_snapshot(repo_id, [], **{**hub, "local_files_only": True})
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def hub_snapshot(repo_id: str, patterns, **hub) -> Path:
    """The local snapshot folder of hub repo `repo_id` holding the files that match `patterns`:
    downloaded, or found in the Hugging Face cache when offline. `hub`: cache_dir, revision,
    local_files_only. Unavailable for any reason: FileNotFoundError saying which and what to do."""
    import huggingface_hub as hf
    from huggingface_hub import errors

    try:
        return Path(hf.snapshot_download(repo_id=repo_id, allow_patterns=list(patterns), **hub))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or no network: {e}). Download it once with network access, or pass a local folder"
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        raise FileNotFoundError(f"could not access hub repo {repo_id!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- HTTP and connection failures: the files are not available
        raise FileNotFoundError(f"downloading {repo_id!r} from the hub failed: {e}") from None


# ---------------------------------------------------------------- building models

def _vae_rename(name: str) -> str:
    """Older diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    if ".attentions." in name:
        for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
            name = name.replace(f".{old}.", f".{new}.")
    return name


def load_model(model, weights: Path, *, dtype, device, allow_pickle=False, rename=None, squeeze_1x1=False,
               what="model"):
    """Fill a meta-device `model` from a checkpoint, strictly, in `dtype` on `device`.

    `rename` maps checkpoint names to the model's; `squeeze_1x1` accepts [C, C, 1, 1] conv weights
    where the model has [C, C] linears (old VAE attention).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    squeeze = _squeeze_1x1(expected) if squeeze_1x1 else (lambda name, shape: tuple(shape))
    shapes = checkpoint_shapes(weights)
    if shapes is not None:   # check names and shapes from the headers before reading any data
        check_keys(expected, {(rename(k) if rename else k): squeeze(rename(k) if rename else k, s)
                              for k, s in shapes.items()}, weights, what)
    sd = load_state_dict(weights, allow_pickle=allow_pickle, dtype=dtype, device=device)
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    sd = {k: v.reshape(squeeze(k, tuple(v.shape))) for k, v in sd.items()}
    if shapes is None:       # a pickle: no header, so check what was read
        check_keys(expected, {k: tuple(v.shape) for k, v in sd.items()}, weights, what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def model_from_state_dict(cls, config, state_dict: dict, *, dtype, device, where, what: str):
    """Build `cls(config)` on the meta device and assign `state_dict` (our names) strictly, in
    `dtype` on `device`: a key or shape that does not fit is a CheckpointError naming it."""
    with torch.device("meta"):
        model = cls(config)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state_dict.items()}, where, what)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=True,
                          assign=True)
    return model.eval().requires_grad_(False)


def _squeeze_1x1(expected):
    def f(name, shape):
        want = expected.get(name)
        if want is not None and len(want) == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
            return tuple(shape[:2])
        return tuple(shape)
    return f


def _config(config, folder, cls, by_name):
    if config is None:
        return cls.from_dict(read_config(folder / "config.json"))
    if isinstance(config, str):
        return by_name(config)
    if isinstance(config, dict):
        return cls.from_dict(config)
    if isinstance(config, cls):
        return config
    raise TypeError(f"config must be None, a name, a dict or a {cls.__name__}; got {type(config).__name__}")


def _load(source, *, model_cls, cfg_cls, by_name, class_name, what, dtype, device, variant, subfolder,
          allow_pickle, config, rename=None, squeeze_1x1=False, **hub):
    dtype = dtype or torch.float32
    if not is_hub_id(source) and Path(source).is_file():   # a bare weights file: config= names the architecture
        if config is None:
            raise ValueError(f"{source} is a weights file; pass config= (a name like 'sd15', a dict or a "
                             f"{cfg_cls.__name__}) to say which {what} it holds")
        weights, cfg = Path(source), _config(config, None, cfg_cls, by_name)
    else:
        folder = resolve_folder(source, subfolder, class_name=class_name, what=what, variant=variant,
                                allow_pickle=allow_pickle, dtype=dtype, **hub)
        cfg = _config(config, folder, cfg_cls, by_name)
        weights = find_weights(folder, variant=variant, allow_pickle=allow_pickle, dtype=dtype)
    with torch.device("meta"):
        model = model_cls(cfg)
    return load_model(model, weights, dtype=dtype, device=device, allow_pickle=allow_pickle, rename=rename,
                      squeeze_1x1=squeeze_1x1, what=what)


def load_unet(source, *, dtype=torch.float32, device="cpu", variant=None, subfolder="unet", allow_pickle=False,
              config=None, cache_dir=None, revision=None, local_files_only=None) -> UNet:
    """A `UNet` with weights from a diffusers folder, a hub id, or a weights file (with config=)."""
    return _load(source, model_cls=UNet, cfg_cls=UNetConfig, by_name=unet_config,
                 class_name="UNet2DConditionModel", what="UNet", dtype=dtype, device=device, variant=variant,
                 subfolder=subfolder, allow_pickle=allow_pickle, config=config,
                 cache_dir=cache_dir, revision=revision, local_files_only=local_files_only)


def load_vae(source, *, dtype=torch.float32, device="cpu", variant=None, subfolder="vae", allow_pickle=False,
             config=None, cache_dir=None, revision=None, local_files_only=None) -> AutoencoderKL:
    """An `AutoencoderKL` with weights from a diffusers folder, a hub id, or a weights file (with config=).

    Old attention names (query/key/value/proj_attn) and 1×1-conv attention weights are accepted.
    """
    return _load(source, model_cls=AutoencoderKL, cfg_cls=VAEConfig, by_name=vae_config,
                 class_name="AutoencoderKL", what="VAE", dtype=dtype, device=device, variant=variant,
                 subfolder=subfolder, allow_pickle=allow_pickle, config=config, rename=_vae_rename, squeeze_1x1=True,
                 cache_dir=cache_dir, revision=revision, local_files_only=local_files_only)
