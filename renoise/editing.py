"""Attention-controlled editing: a source and an edit branch denoised together from one inversion.

    control = EditControl(mode="p2p", cross_replace=0.8, self_inject=0.2, local_blend=("auto",))
    out = editor.edit_pair(inv, "a green square on a black background", control)
    out.source, out.edit        # latents z0 of the source branch (= the reconstruction) and of the edit
    out.mask                    # the blend mask [B, 1, h, w] (local blending and/or the user mask), or None

Both branches start from the inversion's z_T and take its stored noises at every step; they run as
one batch [source; edit] of 2B samples, one UNet call per step (`SamplerLoop`; a peer of
renoise.peers brings its own loop: EDICT's coupled pair, BDIA's recursion, null-text's ∅_t).
The source branch is the reconstruction (source prompt, the inversion's guidance and negative
prompt); the edit branch has the edit prompt (the source prompt as its negative,
`edit_guidance_scale`; run_pair's `edit_negative` changes it). Through the
attention hook (renoise.models.attention_hook) one processor, `AttentionControl`, steers the edit
rows of the conditional half of the batch from the source rows:

- mode "swap": no cross-attention control (the prompt swap of `Editor.edit`);
- mode "p2p": Prompt-to-Prompt. For the first round(cross_replace·n) steps the edit's
  cross-attention maps are the source's: column j of the edit takes column align[j] of the
  source, where `align_tokens` matches the two token sequences (the same token count: word swap,
  j → j; different counts: refinement, tokens without a partner keep their own maps);
- self_inject (either mode): for the first round(self_inject·n) steps the edit's self-attention
  uses the source's maps softmax(q_s k_sᵀ/√d) ("maps") or the source's keys and values ("kv");
- reweight: the edit's cross-attention column of each listed word is multiplied by its factor;
- local_blend: words (or "auto": the tokens the alignment leaves unmatched, the changed words).
  Their cross-attention maps, averaged over heads, layers (bilinear to the latent size) and the
  steps so far, max-pooled 3×3 and scaled to [0, 1] (min to max), are thresholded at `blend_threshold`; the
  union of the source's and the edit's mask M gives x_edit ← lerp(x_source, x_edit, M) after
  every step from round(blend_start·n) on;
- mask: a user mask [H, W] in image pixels (1: may change). A latent cell is inside when any pixel
  of its 8×8 block is > 0.5; outside, x_edit ← x_source after every step (so outside the mask the
  edit's latents are the source's at every step).

The latents are only as faithful as the VAE: outside the mask the edit decodes to decode(z_source),
not to the input. `paste_back(edited, images, edit_mask(control, out))` keeps the input's pixels
there exactly (`Editor.edit(paste_back=images)`, `--paste-back`).

Not under compile=: the processor keeps Python state (the step, the maps it averages); Editor
refuses compile with a control instead of recompiling at every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import samplers as _samplers
from .denoisers import Conditioning, GuidedDenoiser, as_prompts, encode_prompts, negative_conditioning

__all__ = ["EditControl", "EditResult", "AttentionControl", "SamplerLoop", "align_tokens", "word_positions", "run_pair",
           "latent_mask", "blend_mask", "paste_back", "edit_mask", "attention_grid", "MODES", "INJECT_KINDS"]

MODES = ("swap", "p2p")
INJECT_KINDS = ("maps", "kv")


@dataclass(frozen=True)
class EditControl:
    """How the edit branch is steered (see the module docstring). Fractions are of the steps."""
    mode: str = "swap"
    cross_replace: float = 0.8
    self_inject: float = 0.0
    self_inject_kind: str = "maps"
    reweight: tuple = ()                         # ((word, factor), ...)
    local_blend: tuple | None = None             # words, or ("auto",); None: off
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    mask: torch.Tensor | None = field(default=None, compare=False)   # [H, W] or [B, H, W] in [0, 1]
    save_attention: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown edit mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.self_inject_kind not in INJECT_KINDS:
            raise ValueError(f"self_inject_kind must be one of {', '.join(INJECT_KINDS)}, got {self.self_inject_kind!r}")
        for name in ("cross_replace", "self_inject", "blend_start", "blend_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for item in self.reweight:
            if len(item) != 2 or not isinstance(item[0], str) or float(item[1]) < 0:
                raise ValueError(f"reweight takes (word, factor >= 0) pairs, got {item!r}")
        if self.local_blend is not None and not self.local_blend:
            raise ValueError("local_blend needs at least one word (or 'auto' for the changed words)")

    @property
    def plain(self) -> bool:
        """True when the edit branch is an independent prompt swap (no pair needed)."""
        return (self.mode == "swap" and self.self_inject == 0 and not self.reweight and self.local_blend is None
                and self.mask is None and not self.save_attention)


@dataclass
class EditResult:
    source: torch.Tensor                  # [B, C, h, w] the source branch's z0 (the reconstruction)
    edit: torch.Tensor                    # [B, C, h, w] the edit's z0
    mask: torch.Tensor | None             # [B, 1, h, w] the last blend mask (local blend × user mask)
    maps: torch.Tensor | None             # [2B, M, h, w] cross-attention maps averaged over layers and steps
    source_ids: torch.Tensor              # [B, M] token ids
    edit_ids: torch.Tensor
    calls: int                            # UNet calls (each on the 2B batch, doubled again with CFG)


# ---------------------------------------------------------------------------------------------
# tokens

def _content_length(ids: list, pad_id) -> int:
    """Tokens up to and including the first padding/EOS after BOS (all of them without pad_id)."""
    if pad_id is None or pad_id not in ids[1:]:
        return len(ids)
    return ids.index(pad_id, 1) + 1


def align_tokens(source: list, edit: list, pad_id=None) -> list:
    """For each position j of `edit`, the position in `source` of the same token under a longest
    common subsequence alignment, or -1 (a new token). Prompts of the same token count (padding
    after the first `pad_id` not counted) align j → j: a word swap."""
    if _content_length(source, pad_id) == _content_length(edit, pad_id) and len(source) == len(edit):
        return list(range(len(edit)))
    n, m = len(source), len(edit)
    best = [[0] * (m + 1) for _ in range(n + 1)]          # best[i][j]: LCS of source[i:], edit[j:]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = best[i + 1][j + 1] + 1 if source[i] == edit[j] else max(best[i + 1][j], best[i][j + 1])
    out, i, j = [-1] * m, 0, 0
    while i < n and j < m:
        if source[i] == edit[j]:
            out[j] = i
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def changed_positions(source: list, edit: list, pad_id: int) -> tuple[list, list]:
    """(source positions, edit positions) of the tokens the alignment leaves without a partner,
    padding excluded; for equal lengths, the positions where the ids differ."""
    align = align_tokens(source, edit, pad_id)
    if _content_length(source, pad_id) == _content_length(edit, pad_id) and len(source) == len(edit):
        diff = [j for j in range(len(edit)) if source[j] != edit[j]]
        return diff, diff
    matched = {i for i in align if i >= 0}
    return ([i for i, s in enumerate(source) if i not in matched and s != pad_id],
            [j for j, a in enumerate(align) if a < 0 and edit[j] != pad_id])


def word_positions(tokenizer, ids: list, word: str) -> list:
    """Positions in `ids` (a full, padded prompt) of every occurrence of `word`'s tokens."""
    sub = tokenizer.encode(word)
    if not sub:
        raise ValueError(f"{word!r} has no tokens")
    return [i + k for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub for k in range(len(sub))]


def token_labels(tokenizer, ids: list) -> list:
    """Readable text of each token id (BPE word ends `</w>` dropped)."""
    inverse = {v: k for k, v in tokenizer.vocab.items()}
    return [inverse.get(int(i), "?").replace("</w>", "") for i in ids]


# ---------------------------------------------------------------------------------------------
# the attention processor

class AttentionControl:
    """The processor of the pair batch [source (B); edit (B)] (×2 with CFG: [uncond; cond]).

    mapping [B, M] long: source column of each edit column (-1: keep the edit's own); weights
    [B, M] or None: factors on the edit's cross-attention columns; replace_steps / inject_steps:
    how many first steps replace cross maps / inject self-attention; store: average the
    conditional rows' cross maps (mean over heads) at latent size `hw` into `maps_sum` [2B, M, h, w].
    Set `step` before each model call.
    """

    def __init__(self, batch: int, hw, *, mapping=None, weights=None, replace_steps=0, inject_steps=0,
                 inject_kind="maps", store=False):
        self.B, self.hw = batch, tuple(hw)
        self.mapping, self.weights = mapping, weights
        self.replace_steps, self.inject_steps, self.inject_kind = replace_steps, inject_steps, inject_kind
        self.store = store
        self.step = 0
        self.maps_sum, self.maps_count = None, 0

    def _groups(self, q):
        g, rest = divmod(q.shape[0], 2 * self.B)
        if rest or g == 0:
            raise ValueError(f"attention control expects batches of [source; edit] × {self.B}, got {q.shape[0]}")
        return g

    def __call__(self, layer, q, k, v):
        groups = self._groups(q)
        if layer.is_cross:
            return self._cross(q, k, v, groups)
        return self._self(q, k, v, groups)

    def _self(self, q, k, v, groups):
        B = self.B
        if self.step >= self.inject_steps:
            return F.scaled_dot_product_attention(q, k, v)
        rows = torch.arange(q.shape[0], device=q.device).view(groups, 2, B)
        take = rows[:, :1].expand(groups, 2, B).reshape(-1)         # every row reads its source row
        if self.inject_kind == "kv":
            return F.scaled_dot_product_attention(q, k[take], v[take])
        p = _probs(q, k)[take]
        return torch.matmul(p.to(v.dtype), v)

    def _cross(self, q, k, v, groups):
        B = self.B
        replace = self.mapping is not None and self.step < self.replace_steps
        if not (replace or self.store or self.weights is not None):
            return F.scaled_dot_product_attention(q, k, v)
        p = _probs(q, k)                                           # [G·2B, h, N, M] fp32
        cond = p[(groups - 1) * 2 * B:]
        if self.store:
            self._accumulate(cond.mean(1))
        src, edit = cond[:B], cond[B:]
        if replace:
            index = self.mapping.clamp_min(0)[:, None, None, :].expand_as(src)
            edit = torch.where(self.mapping[:, None, None, :] >= 0, src.gather(-1, index), edit)
        if self.weights is not None:
            edit = edit * self.weights[:, None, None, :]
        p = torch.cat([p[:(groups - 1) * 2 * B], src, edit])
        return torch.matmul(p.to(v.dtype), v)

    def _accumulate(self, maps):
        """maps [2B, N, M] → [2B, M, h, w] at latent size, summed over calls."""
        n, N, M = maps.shape
        h, w = self.hw
        f = round((h * w / N) ** 0.5)
        grid = maps.transpose(1, 2).reshape(n, M, h // f, w // f)
        if f != 1:
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        self.maps_sum = grid if self.maps_sum is None else self.maps_sum + grid
        self.maps_count += 1

    @property
    def maps(self):
        """The averaged cross-attention maps [2B, M, h, w], or None before any call."""
        return None if self.maps_sum is None else self.maps_sum / self.maps_count


def _probs(q, k):
    from .models.attention_hook import attention_probs
    return attention_probs(q, k)


# ---------------------------------------------------------------------------------------------
# masks

def latent_mask(mask: torch.Tensor, batch: int, factor: int = 8) -> torch.Tensor:
    """A pixel mask [H, W] or [B, H, W] (1: may change) → [B, 1, H/f, W/f] in {0, 1}: a latent cell
    is inside when any pixel of its f×f block is > 0.5."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] not in (1, batch):
        raise ValueError(f"mask must be [H, W] or [{batch}, H, W], got {tuple(m.shape)}")
    if m.shape[-2] % factor or m.shape[-1] % factor:
        raise ValueError(f"mask size {tuple(m.shape[-2:])} is not a multiple of {factor} (the image's size)")
    inside = F.max_pool2d((m > 0.5).float()[:, None], factor)
    return inside.expand(batch, -1, -1, -1).contiguous()


def paste_back(edited: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, feather: int = 0) -> torch.Tensor:
    """The input outside the edit's mask, in pixels: lerp(images, edited, α).

    edited, images: [B, 3, H, W]. mask: a pixel mask [H, W] or [B, H, W] in [0, 1] (1: the edit's),
    or a latent mask [B, 1, h, w] (EditResult.mask), drawn at H×W as blocks. feather: α is the mask
    grown by `feather` px and then box-blurred over 2·feather + 1 px, so it is 1 on the mask and falls
    to 0 within 2·feather px outside it (0: α is the mask itself). Where α = 0 the result is `images`
    bit for bit."""
    if edited.shape != images.shape or edited.ndim != 4:
        raise ValueError(f"paste_back needs the edit and the input images as [B, 3, H, W] of one shape, got "
                         f"{tuple(edited.shape)} and {tuple(images.shape)}")
    if isinstance(feather, bool) or not isinstance(feather, int) or feather < 0:
        raise ValueError(f"feather must be an int >= 0 (px), got {feather!r}")
    b, _, h, w = edited.shape
    a = torch.as_tensor(mask, dtype=torch.float32, device=edited.device)
    if a.ndim == 4 and a.shape[1] == 1 and h % a.shape[-2] == 0 and a.shape[-1] * h // a.shape[-2] == w:
        a = F.interpolate(a, size=(h, w), mode="nearest")
    elif a.ndim in (2, 3) and tuple(a.shape[-2:]) == (h, w):
        a = a.reshape(-1, 1, h, w)
    else:
        raise ValueError(f"mask {tuple(a.shape)} fits neither the images' {h}x{w} pixels ([H, W], [B, H, W]) nor "
                         f"their latent grid ([B, 1, h, w])")
    if a.shape[0] not in (1, b):
        raise ValueError(f"mask holds {a.shape[0]} masks for {b} images")
    a = a.clamp(0, 1)
    if feather:
        k = 2 * feather + 1
        a = F.avg_pool2d(F.max_pool2d(a, k, 1, feather), k, 1, feather, count_include_pad=False)
    a = a.to(edited.dtype)
    return torch.lerp(images, edited, a)              # exact at α = 0 (images) and α = 1 (edited)


def edit_mask(control: "EditControl | None", result) -> torch.Tensor:
    """Where an edit may change the image: the user's pixel mask (control.mask), else the blend mask
    of its EditResult (local blending). ValueError when the edit has neither."""
    if control is not None and control.mask is not None:
        return control.mask
    mask = getattr(result, "mask", None)
    if mask is None:
        raise ValueError("paste_back keeps the input outside the edit's mask, and this edit has none: give a user "
                         "mask (EditControl(mask=...), --mask) or local blending (local_blend=, --local-blend)")
    return mask


def blend_mask(maps: torch.Tensor, src_pos: list, edit_pos: list, threshold: float) -> torch.Tensor:
    """Local blending's mask [B, 1, h, w] from averaged maps [2B, M, h, w]: per branch the maps of
    its words summed, max-pooled 3×3, scaled to [0, 1] (min to max) and thresholded (>=); the union
    of both branches. (P2P scales by the max alone; on small models the maps' floor is high.)"""
    B = maps.shape[0] // 2
    out = []
    for b in range(B):
        parts = []
        for rows, pos in ((maps[b], src_pos[b]), (maps[B + b], edit_pos[b])):
            if not pos:
                continue
            m = F.max_pool2d(rows[pos].sum(0)[None, None], 3, 1, 1)
            m = (m - m.amin()) / (m.amax() - m.amin()).clamp_min(1e-12)
            parts.append(m >= threshold)
        union = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        out.append(union.float()[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# the pair run

def _positions(tokenizer, src_ids, edit_ids, control, edit_prompts):
    """Blend positions per image (source, edit) and reweight factors [B, M] (None when unused)."""
    pad = tokenizer.pad_token_id
    B, M = edit_ids.shape
    src_pos, edit_pos = [], []
    weights = torch.ones(B, M) if control.reweight else None
    for b in range(B):
        s, e = src_ids[b].tolist(), edit_ids[b].tolist()
        if control.local_blend is not None:
            if tuple(control.local_blend) == ("auto",):
                sp, ep = changed_positions(s, e, pad)
                if not sp and not ep:
                    raise ValueError("local_blend 'auto' found no changed word: the edit prompt has the source "
                                     "prompt's tokens; name the words to blend")
            else:
                sp, ep = [], []
                for word in control.local_blend:
                    ws, we = word_positions(tokenizer, s, word), word_positions(tokenizer, e, word)
                    if not ws and not we:
                        raise ValueError(f"local-blend word {word!r} is in neither the source nor the edit prompt")
                    sp, ep = sp + ws, ep + we
            src_pos.append(sp)
            edit_pos.append(ep)
        for word, factor in control.reweight:
            pos = word_positions(tokenizer, e, word)
            if not pos:
                raise ValueError(f"reweight word {word!r} is not in the edit prompt {edit_prompts[b]!r}")
            weights[b, pos] = float(factor)
    return src_pos, edit_pos, weights


class SamplerLoop:
    """How a pair run denoises: the state is a tuple of latents [2B, ...] (source rows, then edit
    rows), `step` takes it from t to t' with the denoiser, and every latent in it is blended after
    each step. This one is the inversion's sampler: (x,) -> (step(x, den(x, t), t, t', n_i),) with
    the inversion's stored noises n_i. The peers with their own sampling (EDICT's coupled pair,
    BDIA's recursion, null-text's per-step ∅_t) bring their own (renoise.peers.editors)."""

    def __init__(self, result):
        self.result = result
        self.smod = _samplers.get(result.sampler)

    def start(self) -> tuple:
        """The state at z_T, for B samples (run_pair doubles it)."""
        return (self.result.z_T,)

    def step(self, state, i, t, tn, den) -> tuple:
        (x,) = state
        res = self.result
        noise = res.noises[i] if res.noises else None
        noise = None if noise is None else torch.cat([noise, noise])
        return (self.smod.step(x, den(x, t), t, tn, res.schedule, noise=noise, **getattr(res, "sampler_opts", {})),)

    def output(self, state) -> torch.Tensor:
        """The denoised latents z0 [2B, ...]."""
        return state[0]


@torch.no_grad()
def run_pair(editor, inv, edit_prompts, control: EditControl, *, edit_guidance_scale=1.0, edit_negative="source",
             loop=None, callback=None) -> EditResult:
    """Denoise [source; edit] from inv's z_T with its stored noises under `control`.
    edit_negative: the edit branch's negative prompts ("source": inv's prompts, ReNoise's protocol;
    None: the empty prompt); loop: a SamplerLoop (default: inv's sampler).
    callback(step_index, t, x_edit, x_source) after each step (and its blending)."""
    from .models.attention_hook import attention_hook

    if editor.compile is not None and not control.plain:
        raise ValueError("attention-controlled edits (p2p, self-injection, reweighting, local blending, masks, "
                         "saved attention) run eagerly: use compile=None (drop --compile) for them")
    pipe, res, B = editor.pipe, inv.result, inv.batch
    edit_prompts = as_prompts(edit_prompts, B, "edit prompt")
    kw = dict(size=inv.size, clip_skip=inv.clip_skip)
    g_src, g_edit = float(inv.guidance_scale), float(edit_guidance_scale)
    cfg = max(g_src, g_edit) > 1
    cond = Conditioning.cat([encode_prompts(pipe, inv.prompts, **kw), encode_prompts(pipe, edit_prompts, **kw)])
    uncond = None
    if cfg:
        uncond = Conditioning.cat([negative_conditioning(pipe, inv.negative_prompts, cond_half(cond, B, 0), **kw),
                                   negative_conditioning(pipe, inv.prompts if edit_negative == "source"
                                                         else edit_negative, cond_half(cond, B, 1), **kw)])
    scales = torch.tensor([g_src] * B + [g_edit] * B)
    den = GuidedDenoiser(pipe.unet, res.schedule, res.sampler, cond, uncond,
                         scales if g_src != g_edit else g_src)

    tok = pipe.tokenizer
    src_ids, edit_ids = tok(inv.prompts), tok(edit_prompts)
    n = len(res.chain)
    mapping = None
    if control.mode == "p2p":
        mapping = torch.tensor([align_tokens(s.tolist(), e.tolist(), tok.pad_token_id)
                                for s, e in zip(src_ids, edit_ids)])
    src_pos, edit_pos, weights = _positions(tok, src_ids, edit_ids, control, edit_prompts)
    h, w = res.z_T.shape[-2:]
    device = res.z_T.device
    proc = AttentionControl(
        B, (h, w), mapping=None if mapping is None else mapping.to(device),
        weights=None if weights is None else weights.to(device), replace_steps=round(control.cross_replace * n),
        inject_steps=round(control.self_inject * n), inject_kind=control.self_inject_kind,
        store=control.local_blend is not None or control.save_attention)
    user = None if control.mask is None else latent_mask(control.mask, B).to(device)
    if user is not None and user.shape[-2:] != (h, w):
        raise ValueError(f"mask is {control.mask.shape[-2]}x{control.mask.shape[-1]} px but the images are "
                         f"{inv.size[0]}x{inv.size[1]}")

    loop = SamplerLoop(res) if loop is None else loop
    state = tuple(torch.cat([v, v]) for v in loop.start())
    mask = user
    blend_from = round(control.blend_start * n)
    with attention_hook(pipe.unet, proc):
        for i, (t, tn) in enumerate(res.chain):
            proc.step = i
            state = loop.step(state, i, t, tn, den)
            if control.local_blend is not None and i >= blend_from and proc.maps is not None:   # maps: after a call
                m = blend_mask(proc.maps, src_pos, edit_pos, control.blend_threshold)
                mask = m if user is None else m * user
            if mask is not None:
                state = tuple(torch.cat([v[:B], torch.lerp(v[:B], v[B:], mask.to(v.dtype))]) for v in state)
            if callback is not None:
                x = loop.output(state)
                callback(i, t, x[B:], x[:B])
    x = loop.output(state)
    return EditResult(source=x[:B], edit=x[B:], mask=mask, maps=proc.maps, source_ids=src_ids, edit_ids=edit_ids,
                      calls=den.calls)


def cond_half(cond, B, half):
    """Rows [half·B, (half+1)·B) of a Conditioning."""
    return Conditioning(*(None if v is None else v[half * B:(half + 1) * B] for v in cond._fields()))


# ---------------------------------------------------------------------------------------------
# pictures

def attention_grid(maps: torch.Tensor, labels: list, *, cell: int = 64):
    """A PIL image: one labelled tile per token, each map [h, w] scaled to its own max (white = high)."""
    from PIL import Image, ImageDraw
    n = len(labels)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    pad = 14
    sheet = Image.new("RGB", (cols * cell, rows * (cell + pad)), "black")
    draw = ImageDraw.Draw(sheet)
    for i, (m, label) in enumerate(zip(maps, labels)):
        m = m.float().cpu()
        m = (m / m.max().clamp_min(1e-12) * 255).clamp(0, 255).to(torch.uint8).numpy()
        tile = Image.fromarray(m, "L").resize((cell, cell), Image.NEAREST).convert("RGB")
        x, y = (i % cols) * cell, (i // cols) * (cell + pad)
        sheet.paste(tile, (x, y + pad))
        draw.text((x + 2, y + 1), label[:10], fill="white")
    return sheet
