"""The capabilities past the scan, as mixins for a ``ScanAdapter`` (``memdetect.models.base``), each with defaults
that refuse with a message naming the family where the family does not override them; ``base.Adapter`` has them all.
What each feature needs of them, as protocols, and the check that says when a family lacks one:
``memdetect.models.capabilities``.

* conditioning (``ConditioningMixin``): ``encode_condition`` turns prompts or class indices into the condition
  ``predict_noise`` takes; ``num_classes``;
* NeMo's layers (``CrossAttentionMixin``): ``cross_attention_values`` finds the text cross-attention value layers in
  the module tree;
* guard (``GuardMixin``): the family's diffusers pipeline (``load_pipeline``, ``from_pipeline``) and how to read and
  repeat its denoiser calls (``guard_step``, ``pipeline_call``, ``guard_subset``), with the record it reads
  (``GuardStep``);
* generation (``GenerationMixin``): ``sample`` (DDIM here; a family with another sampler overrides it), the record it
  returns (``Sample``), and ``decode`` (model space -> uint8 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError, UsageError
from .pixels import to_uint8

#: what ``Adapter.conditioning`` may be, and how to say it
CONDITIONING = {"text": "text-conditional (prompts)", "class": "class-conditional", None: "unconditional"}


@dataclass(frozen=True)
class GuardStep:
    """What ``memdetect.guard`` reads from one denoiser call inside a diffusers pipeline (``Adapter.guard_step``):
    the denoiser's input ``x`` (the whole batch), its timestep ``t``, ``rows``: one row of the batch per image, in
    image order, and ``unconditional``: whether those rows carry the null condition (the unconditional half under
    classifier-free guidance, every row of an unconditional model). When they do not (a conditional model sampled
    without guidance, or with a negative prompt), the guard runs one extra forward of ``x[rows]`` with the null
    condition at the guarded step."""

    x: torch.Tensor
    t: int
    rows: slice
    unconditional: bool


@dataclass(frozen=True)
class Sample:
    """What a sampler returns, in model space (float32): the samples, the sampler's first denoiser input, its first
    timestep (-1 for samplers without DDPM timesteps) and, with a condition, Wen et al.'s noise-difference norms
    ||eps(x, c) - eps(x, null)|| at every step ([steps, B]; None without a condition)."""

    x0: torch.Tensor
    x_T: torch.Tensor
    first_t: int
    noise_difference: torch.Tensor | None = None


class Sampling:
    """How a family samples: read by its own sampler (``GenerationMixin``) and by its diffusers pipeline
    (``GuardMixin.pipeline_call``, ``memdetect generate``)."""

    #: the default number of steps, DDIM's eta (1: DDPM's ancestral sampler) and how to name the sampler
    sampling_steps: ClassVar[int] = 50
    sampling_eta: ClassVar[float] = 0.0
    sampler: ClassVar[str] = "DDIM (eta=0)"


class ConditioningMixin:
    """The conditioning capability (``capabilities.Conditioning``), for a ``ScanAdapter``: conditions -> what
    ``predict_noise`` takes. These defaults refuse: a conditional family overrides them."""

    family: ClassVar[str]
    conditioning: ClassVar[str | None]

    def encode_condition(self, values: Sequence[str] | Sequence[int]) -> Any:
        """Prompts (``conditioning == "text"``) or class indices (``"class"``) -> the condition ``predict_noise``
        takes, one per value (batch first)."""
        raise UsageError(f"{self.family} models are {CONDITIONING[self.conditioning]}: they take no condition")

    @property
    def num_classes(self) -> int | None:
        """How many classes a class-conditional model knows (None for the others)."""
        return None


class CrossAttentionMixin:
    """The text cross-attention value layers NeMo reads (``capabilities.CrossAttention``), for a ``ScanAdapter``.
    This default refuses: a text-conditional family overrides it."""

    family: ClassVar[str]

    def cross_attention_values(self) -> dict[str, nn.Module]:
        """The value projections of the denoiser's text cross-attention that NeMo reads, by module name, in forward
        order (text-conditional families only)."""
        raise UnsupportedModelError(f"{self.family} models have no text cross-attention (NeMo needs a "
                                    f"text-conditional model)")


class GuardMixin(Sampling):
    """The family's diffusers pipeline (``capabilities.Guarding``: ``memdetect.guard``, ``memdetect generate``), for a
    ``ScanAdapter``. ``from_pipeline`` and ``load_pipeline`` refuse unless the family overrides them; the other
    defaults fit diffusers' unconditional DDIM / DDPM pipelines."""

    family: ClassVar[str]
    conditioning: ClassVar[str | None]

    @classmethod
    def from_pipeline(cls, pipe) -> "GuardMixin":
        """An adapter over the modules of a loaded diffusers pipeline of this family (shared, not copied)."""
        raise UnsupportedModelError(f"memdetect.guard does not support {cls.family} pipelines")

    @classmethod
    def load_pipeline(cls, source: str, *, device: torch.device, dtype: torch.dtype):
        """The diffusers pipeline of this family from a local folder or hub id (``memdetect generate``)."""
        raise UnsupportedModelError(f"memdetect generate does not support {cls.family} models")

    def guard_step(self, pipe, call: dict, args: tuple, kwargs: dict) -> GuardStep:
        """Read one denoiser call of ``pipe`` (positional ``args`` and keyword ``kwargs``; ``call``: the keywords the
        pipeline was called with). This default fits diffusers' unconditional pipelines: ``denoiser(x, t)``, every
        row unconditional."""
        return GuardStep(_call_input(args, kwargs), _call_timestep(args, kwargs), slice(None), True)

    def pipeline_call(self, conditions: Sequence | None, n: int, *, steps: int | None,
                      guidance: float | None) -> dict:
        """The keywords of one call of this family's pipeline (``load_pipeline``) that makes ``n`` images per
        condition (prompt or class; None for an unconditional model). This default: an unconditional DDIM pipeline,
        ``sampling_eta`` over ``steps`` (default ``sampling_steps``)."""
        if conditions:
            raise UsageError(f"{self.family} models are {CONDITIONING[self.conditioning]}: they take no prompt or class")
        return {"batch_size": n, "num_inference_steps": steps or self.sampling_steps, "eta": float(self.sampling_eta)}

    def guard_subset(self, call: dict, indices: Sequence[int], n_images: int) -> dict:
        """The pipeline keywords that generate again only images ``indices`` of a call with keywords ``call`` that
        made ``n_images`` (``regenerate``; the guard adds fresh generators). Unconditional: a smaller batch."""
        return {**call, "batch_size": len(indices)}


class GenerationMixin(Sampling):
    """Generation in model space (``capabilities.Generation``), for a ``ScanAdapter``: DDIM with the family's own
    scheduler by default (a family with another sampler overrides ``sample``), and ``decode`` to pixels."""

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], *, cond: Any = None, steps: int | None = None,
               guidance: float = 1.0) -> Sample:
        """Generate one sample per seed in model space: DDIM with ``sampling_eta`` over ``steps`` (default
        ``sampling_steps``) and classifier-free guidance eps = u + g (c - u) when a condition is given.

        diffusers' ``DDIMScheduler`` is built from the model's own scheduler config (its betas and timestep spacing),
        as Wen et al. and NeMo swap it into the SD pipeline; ``eta=1`` with every training timestep is DDPM's
        ancestral sampler with the posterior variance. With a condition both predictions are always evaluated
        (Wen et al.'s norms need them). Every sample's initial noise (and DDPM's per-step noise) comes from its own
        CPU generator seeded by the caller: a sample is the same alone or in any batch.
        """
        from diffusers import DDIMScheduler

        steps = steps or self.sampling_steps
        if not 1 <= steps <= self.num_train_timesteps:
            raise UsageError(f"--steps must be in [1, {self.num_train_timesteps}], got {steps}")
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        eta = float(self.sampling_eta)
        x = self.initial_noise(seeds) * float(sched.init_noise_sigma)
        x_T = x.clone()
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds] if eta > 0 else None
        norms = []
        for t in sched.timesteps:
            t = int(t)
            model_in = sched.scale_model_input(x, t).to(self.dtype)
            if cond is None:
                eps = self.predict_noise(model_in, t).float()
            else:
                eps_c, eps_u = self.predict_noise(model_in, t, cond).float(), self.predict_noise(model_in, t).float()
                norms.append(noise_difference_norm(eps_c, eps_u).cpu())
                eps = eps_u + guidance * (eps_c - eps_u)
            noise = None
            if gens is not None:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample.float()
        return Sample(x, x_T, int(sched.timesteps[0]), torch.stack(norms) if norms else None)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """eps ~ N(0, I) in the model's input space, one CPU generator per seed (``draw_noise``)."""
        return self.draw_noise(torch.empty(len(seeds), *self.latent_shape(), device=self.device), seeds)

    def first_sampling_step(self, steps: int) -> int | str:
        """The first timestep of the model's own sampler over ``steps`` steps (here DDIM from the scheduler config)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(int(steps))
        return int(sched.timesteps[0])

    @torch.no_grad()
    def first_step_difference(self, seeds: Sequence[int], cond: Any, steps: int) -> torch.Tensor:
        """Wen et al.'s first-step quantity: ||eps(x_T, t_1, cond) - eps(x_T, t_1, null)|| per sample at the
        generation's initial noise x_T (``initial_noise(seeds)``) and the sampler's first timestep t_1 (a baseline in
        the family's own terms, ``memdetect.bench.baselines``)."""
        t = self.first_sampling_step(steps)
        x_T = self.initial_noise(seeds).to(self.dtype)
        return noise_difference_norm(self.predict_noise(x_T, t, cond), self.predict_noise(x_T, t))

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> uint8 [B, 3, R, R] on the CPU (pixel models: x0 is the image in [-1, 1])."""
        return to_uint8(x0)


def _call_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The denoiser's input in a diffusers denoiser call: the first positional argument, or ``sample`` /
    ``hidden_states`` by keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("sample", "hidden_states"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise UnsupportedModelError("cannot find the denoiser's input in its call (expected a tensor first)")


def _call_timestep(args: tuple, kwargs: dict) -> int:
    """The timestep of a diffusers denoiser call: the second positional argument or ``timestep`` (a number, a 0-d
    tensor or one value per row, all equal in a pipeline)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise UnsupportedModelError("cannot find the timestep in the denoiser's call")
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[0].item()
    return int(round(float(t)))


def noise_difference_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """||eps_cond - eps_uncond||_2 per sample (float32, on the inputs' device): Wen et al.'s per-step quantity."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)
