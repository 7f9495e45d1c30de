"""The peers on a loaded pipeline: Editor subclasses that `renoise eval` runs beside ReNoise.

Each has Editor's interface (invert, reconstruct_latents, edit_latents, pipe, plan) and builds
everything from the same pieces: the pipeline's GuidedDenoiser, renoise.invert for the peers that
are ReNoise plans (plain DDIM, DDIM with CFG, fixed-point with CFG, AIDI, negative-prompt), and the
loops of renoise.peers.exact / nulltext / newton for the others. `spec` is a resolved peer
(renoise.peers.resolve): its kind, the paper's settings, and the guidance protocol:

    guidance        CFG scale of the inversion and the reconstruction (negative: the empty prompt)
    edit_guidance   CFG scale of the edit (None: the run's --edit-guidance)
    edit_negative   "source": the source prompt is the edit's negative (ReNoise's protocol);
                    "empty": the empty prompt (Prompt-to-Prompt's); "null": null-text's optimised ∅_t

Costs: `result.unet_evals` (network evaluations at the image batch) and `result.backward`
(backward passes); `backward_ratio` is measured on first need (renoise.peers.cost), once per
model and batch shape for the whole process.
"""
from __future__ import annotations

from .. import presets
from ..editing import EditControl, SamplerLoop, cond_half, run_pair
from ..pipeline import Conditioning, Editor, GuidedDenoiser, Inversion, as_prompts, encode_images, negative_conditioning
from . import cost, exact, newton, nulltext

_RATIOS = {}


class EDICTLoop(SamplerLoop):
    """EDICT's coupled steps for a pair run: the state (x, y), both blended."""

    def start(self):
        return (self.result.z_T, self.result.state["y_T"])

    def step(self, state, i, t, tn, den):
        return exact.edict_step(den, self.smod, self.result.schedule, *state, t, tn, self.result.state["p"])


class BDIALoop(SamplerLoop):
    """BDIA's recursion for a pair run: the state (x_{k-1}, x_k), both blended; step 0 is the stored
    x_1 (no call), or on a one-step chain the plain step."""

    def start(self):
        x_1 = self.result.state["x_1"]
        return (self.result.z_T, self.result.z_T if x_1 is None else x_1)

    def step(self, state, i, t, tn, den):
        res = self.result
        if i == 0 and res.state["x_1"] is not None:
            return state
        return exact.bdia_step(den, self.smod, res.schedule, res.chain, i, *state, res.state["gamma"])

    def output(self, state):
        return state[1]


def _null_at(result, i) -> Conditioning:
    """Null-text's optimised unconditional conditioning ∅_i of step i."""
    nc = result.state["null_cond"]
    return Conditioning(result.state["nulls"][i], nc.text_embeds, nc.time_ids)


class NullTextLoop(SamplerLoop):
    """Null-text's sampling for a pair run: step i's unconditional branch is the optimised ∅_i on the
    source rows, and on the edit rows too unless the edit's negative is the source prompt (as in
    NullTextPeer.sample: Prompt-to-Prompt's protocol with null-text); then they keep run_pair's."""

    def __init__(self, result, edit_null: bool):
        super().__init__(result)
        self.edit_null, self.base = edit_null, None

    def step(self, state, i, t, tn, den):
        if den.uncond is None:                  # no CFG: the nulls are never used (as in NullTextPeer.sample)
            return super().step(state, i, t, tn, den)
        if self.base is None:
            self.base = den.uncond
        B = state[0].shape[0] // 2
        null = _null_at(self.result, i)
        den.uncond = Conditioning.cat([null, null if self.edit_null else cond_half(self.base, B, 1)])
        return super().step(state, i, t, tn, den)


class PeerEditor(Editor):
    """Editor for one peer; `plan` carries the run's sampler and steps (and a plan peer's fields)."""

    def __init__(self, pipe, plan, spec: dict):
        super().__init__(pipe, plan)
        self.spec = dict(spec)
        self.backward_ratio = None

    # -- shared ----------------------------------------------------------------------------------
    def _edit_setup(self, inv, edit_guidance_scale):
        g = self.spec.get("edit_guidance")
        g = float(edit_guidance_scale) if g is None else float(g)
        negative = inv.prompts if self.spec.get("edit_negative", "source") == "source" else None
        return g, negative

    def pair_loop(self, inv) -> SamplerLoop:
        """How this peer denoises in a pair run (renoise.editing.run_pair): its own sampling."""
        return SamplerLoop(inv.result)

    def edit_pair(self, inv, edit_prompts, control=None, *, edit_guidance_scale=1.0, num_steps=None, callback=None):
        """Editor.edit_pair under this peer's edit protocol (its guidance and negative) and sampling."""
        inv.check_num_steps(num_steps)
        g, negative = self._edit_setup(inv, edit_guidance_scale)
        return run_pair(self, inv, edit_prompts, control or EditControl(), edit_guidance_scale=g,
                        edit_negative=negative, loop=self.pair_loop(inv), callback=callback)

    def edit_latents(self, inv, edit_prompts, *, edit_guidance_scale=1.0, num_steps=None, callback=None,
                     control=None):
        """The peer's own edit (its protocol, its sampling); with an editing mode (renoise.editing),
        the pair run of edit_pair."""
        if control is not None and not control.plain:
            return super().edit_latents(inv, edit_prompts, edit_guidance_scale=edit_guidance_scale,
                                        num_steps=num_steps, callback=callback, control=control)
        g, negative = self._edit_setup(inv, edit_guidance_scale)
        return self.sample(inv, edit_prompts, negative_prompts=negative, guidance_scale=g, num_steps=num_steps,
                           callback=callback)

    def _measure_ratio(self, z):
        key = (id(self.pipe.unet), tuple(z.shape), str(z.device))
        if key not in _RATIOS:
            den = self.denoiser([""] * z.shape[0], (z.shape[-2] * 8, z.shape[-1] * 8))
            t = self.schedule.chain(self.plan.num_steps, self.plan.sampler)[0][0]
            _RATIOS[key] = cost.backward_ratio(lambda x: den(x, t), z)
        self.backward_ratio = _RATIOS[key]

    def _latents(self, images, prompts, generator, sample_posterior):
        batch, size = images.shape[0], tuple(images.shape[-2:])
        prompts = as_prompts(prompts, batch)
        z0 = encode_images(self.pipe, images, generator, sample=sample_posterior)
        return z0, prompts, size

    def _finish(self, result, prompts, size, g, evals):
        result.unet_evals = evals
        return Inversion(result=result, prompts=prompts, size=size, guidance_scale=g, negative_prompts=None,
                         clip_skip=self.clip_skip, extra={"unet_evals": evals, "backward": result.backward})


class PlanPeer(PeerEditor):
    """A peer that is a ReNoise plan (renoise.invert); only its edit protocol differs."""

    def invert(self, images, prompts, *, negative_prompts=None, generator=None, sample_posterior=True, noises=None,
               callback=None):
        inv = super().invert(images, prompts, generator=generator, sample_posterior=sample_posterior, noises=noises,
                             callback=callback)
        inv.extra["backward"] = 0
        return inv


class _LoopPeer(PeerEditor):
    """A peer with its own invert / sample pair (subclasses: _invert(den, z0), _sample(den, inv))."""

    def invert(self, images, prompts, *, negative_prompts=None, generator=None, sample_posterior=True, noises=None,
               callback=None):
        z0, prompts, size = self._latents(images, prompts, generator, sample_posterior)
        g = float(self.spec.get("guidance", 1.0))
        den = self.denoiser(prompts, size, guidance_scale=g, clip_skip=self.clip_skip)
        result = self._invert(den, z0)
        if result.backward:
            self._measure_ratio(z0)
        return self._finish(result, prompts, size, g, den.evals)

    def sample(self, inv, prompts=None, *, negative_prompts=None, guidance_scale=None, num_steps=None, callback=None):
        inv.check_num_steps(num_steps)
        prompts = inv.prompts if prompts is None else as_prompts(prompts, inv.batch)
        g = inv.guidance_scale if guidance_scale is None else float(guidance_scale)
        den = self.denoiser(prompts, inv.size, negative_prompts=negative_prompts, guidance_scale=g,
                            clip_skip=inv.clip_skip)
        return self._sample(den, inv), den


class EDICTPeer(_LoopPeer):
    def _invert(self, den, z0):
        return exact.edict_invert(den, z0, self.schedule, self.plan.sampler, self.plan.num_steps, p=self.spec["p"])

    def _sample(self, den, inv):
        return exact.edict_sample(den, inv.result)

    def pair_loop(self, inv):
        return EDICTLoop(inv.result)


class BDIAPeer(_LoopPeer):
    def _invert(self, den, z0):
        return exact.bdia_invert(den, z0, self.schedule, self.plan.sampler, self.plan.num_steps,
                                 gamma=self.spec["gamma"])

    def _sample(self, den, inv):
        return exact.bdia_sample(den, inv.result)

    def pair_loop(self, inv):
        return BDIALoop(inv.result)


class GNRIPeer(_LoopPeer):
    def _invert(self, den, z0):
        return newton.gnri_invert(den, z0, self.schedule, self.plan.sampler, self.plan.num_steps,
                                  iters=self.spec["iters"], lam=self.spec["lam"], autograd=self.spec["autograd"],
                                  eta=self.spec["eta"])

    def _sample(self, den, inv):
        return nulltext.sample(lambda i: den, inv.result)


class NullTextPeer(_LoopPeer):
    """Null-text inversion: the pivot is renoise.invert's plain DDIM inversion at guidance 1."""

    def invert(self, images, prompts, *, negative_prompts=None, generator=None, sample_posterior=True, noises=None,
               callback=None):
        from ..inversion import invert
        from ._common import PeerResult
        z0, prompts, size = self._latents(images, prompts, generator, sample_posterior)
        cond_den = self.denoiser(prompts, size, guidance_scale=1.0, clip_skip=self.clip_skip)
        sampler, n = self.plan.sampler, self.plan.num_steps
        pivot = invert(cond_den, z0, self.schedule, sampler, n, presets.Plan(sampler=sampler, num_steps=n))
        null_cond = negative_conditioning(self.pipe, None, cond_den.cond, size=size, clip_skip=self.clip_skip)
        uncond_den = GuidedDenoiser(self.pipe.unet, self.schedule, sampler, null_cond)

        def uncond(x, t, null):
            uncond_den.cond = Conditioning(null, null_cond.text_embeds, null_cond.time_ids)
            return uncond_den(x, t)

        s = self.spec
        nulls, log, counts = nulltext.optimize_nulls(cond_den, uncond, null_cond.context, pivot.trajectory,
                                                     self.schedule, sampler, n, guidance=s["guidance"],
                                                     inner_steps=s["inner_steps"], lr=s["lr"],
                                                     early_stop=s["early_stop"])
        calls = cond_den.calls + uncond_den.calls
        result = PeerResult("null-text", pivot.z_T, pivot.trajectory, self.schedule, sampler, n, pivot.timesteps,
                            model_calls=calls, backward=counts["backward"], log=log,
                            state={"nulls": nulls, "null_cond": null_cond})
        if result.backward:
            self._measure_ratio(z0)
        return self._finish(result, prompts, size, float(s["guidance"]), cond_den.evals + uncond_den.evals)

    def sample(self, inv, prompts=None, *, negative_prompts=None, guidance_scale=None, num_steps=None, callback=None):
        inv.check_num_steps(num_steps)
        prompts = inv.prompts if prompts is None else as_prompts(prompts, inv.batch)
        g = inv.guidance_scale if guidance_scale is None else float(guidance_scale)
        den = self.denoiser(prompts, inv.size, negative_prompts=negative_prompts, guidance_scale=g,
                            clip_skip=inv.clip_skip)
        if negative_prompts is None and den.cfg:      # the optimised ∅_t as the unconditional branch

            def per_step(i):
                den.uncond = _null_at(inv.result, i)
                return den
        else:
            def per_step(i):
                return den
        return nulltext.sample(per_step, inv.result), den

    def reconstruct_latents(self, inv, *, num_steps=None, callback=None):
        return self.sample(inv, num_steps=num_steps)

    def pair_loop(self, inv):
        return NullTextLoop(inv.result, edit_null=self.spec.get("edit_negative", "source") != "source")


KINDS = {"plan": PlanPeer, "edict": EDICTPeer, "bdia": BDIAPeer, "gnri": GNRIPeer, "null-text": NullTextPeer}


def make(pipe, plan, spec: dict) -> PeerEditor:
    """The editor of a resolved peer spec (renoise.peers.resolve) for `pipe`, with `plan`'s sampler and steps."""
    if spec.get("kind") not in KINDS:
        raise ValueError(f"unknown peer kind {spec.get('kind')!r}; expected one of {', '.join(KINDS)}")
    return KINDS[spec["kind"]](pipe, plan, spec)
