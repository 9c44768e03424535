"""DQC (distillation quantization calibration, 2DQuant section 3.3): the bounds trained by distillation.

Paper: Liu et al., "2DQuant", NeurIPS 2024. Official code: `TDQuantModel.optimize_parameters` in
`basicsr/models/2dquant_model.py` (github.com/Kai-Liu001/2DQuant). Only the bounds are trained (the network
weights are frozen); the teacher is the FP model and the student is the same module and params with the
bounds as its "bounds" collection. Straight-through gradients come from `jaxquant.quant.fake_quant`.

Losses (spec section 5):
- `official`, exactly as coded: l_pix = mean|O_q - O_fp| / O.numel() * B, plus for each of the 4 stage features
  5 * mean((Fq/nq - F/nf)^2) / numel, where nq, nf are detached per-sample norms shaped (B,1,1,1) divided into
  features shaped (B, L, C): PyTorch broadcasts that to (B, B, L, C), and so do we, on purpose (in closed form).
- `paper`: mean|O_q - O_fp| + feature_weight * sum_i mean_b ||F_b/||F_b|| - Fq_b/||Fq_b|| ||_2 / (L_i C_i).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxquant.cpu_memory import cpu_scratch_kept
from jaxquant.quant import flat_bounds, is_weight_site, nest_bounds, quantized_site
from jaxquant import models
from jaxquant.models import ModelConfig

Array = jax.Array
LossMode = Literal["official", "paper"]
# The most LR pixels a DQC batch may hold (batch x patch^2) for a CPU step with stored activations: the
# scratch grows ~320 KB a pixel (SwinIR-light: 1.27 GiB at 4 x 32 x 32), and glibc keeps at most 2 GiB.
STORED_PIXELS_MAX = 4 * 32 * 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class DQCConfig:
    """Optimisation of the bounds. Defaults are the official code's (spec section 5).

    `steps`, `batch` and `patch` are the settings of a DQC loop (`pipeline.distill`); one `dqc_step` uses the
    batch it is given."""

    loss: LossMode = "official"
    feature_weight: float = 1.0  # `paper` loss only; the paper leaves lambda unstated
    steps: int = 4000
    batch: int = 16  # LR patches a step
    patch: int = 64  # their side, in LR pixels
    lr: float = 1e-2
    # Learning rate of the weight sites' bounds; None: `lr`, as the official code. Adam moves every bound by about
    # the lr a step whatever its gradient's size, so small weight ranges (NGswin's N-gram attention: 0.4-2.0)
    # cross at the official 0.01 (docs/ngswin.md).
    weight_lr: float | None = None
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    cosine: bool = False  # official: constant LR; paper: cosine decay
    # How the student's Swin blocks run: the same arithmetic, rounded perhaps differently. None picks by backend
    # and, on a CPU, by whether the process keeps XLA's scratch (`block_execution`).
    remat: bool | None = None  # recompute them in the backward pass instead of storing activations (`SwinIR.remat`)
    scan: bool | None = None  # run them as a `lax.scan` over block pairs (`SwinIR.scan`)
    # For each step's images (B, H, W, C): unset, remat and scan are picked from B * H * W (`block_execution`).

    def __post_init__(self):
        if self.loss not in ("official", "paper"):
            raise ValueError(f"DQC loss must be 'official' or 'paper', got {self.loss!r}")
        for name in ("steps", "batch", "patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DQC {name} must be at least 1, got {getattr(self, name)}")
        if self.weight_lr is not None and not self.weight_lr > 0:
            raise ValueError(f"DQC weight_lr must be > 0 (or unset: lr), got {self.weight_lr}")
        if not (self.lr > 0 and self.eps > 0 and self.feature_weight >= 0 and 0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"DQC needs lr > 0, eps > 0, feature_weight >= 0 and betas in [0, 1), got lr {self.lr}, "
                             f"eps {self.eps}, feature_weight {self.feature_weight}, betas ({self.b1}, {self.b2})")

    def block_execution(self, pixels: int) -> tuple[bool, bool]:
        """`(remat, scan)` for a batch of `pixels` LR pixels (B * H * W), by backend where unset. On an
        accelerator neither: on an H100 the scan's per-iteration bookkeeping of the bound scalars became
        thousands of tiny kernels, and unrolled with stored activations a step (x2, batch 16, 64x64) takes 65 ms
        and 14 GB. On a CPU neither too where the process keeps XLA's scratch (`cpu_memory.keep_cpu_scratch`, as
        the scripts do) and the batch's scratch fits what it keeps: x4, batch 4 of 32x32 on 2 cores, 478-489 ms
        a step against 534-549 ms recomputed. Otherwise recomputed, inside a scan (unrolled, XLA:CPU moves the
        recomputation back into the forward pass): stored activations would page-fault their scratch in afresh
        each call (811 ms, against 575-628 ms recomputed, which needs ~150 MB of it; benchmarks/README.md)."""
        on_cpu = jax.default_backend() == "cpu"
        store = not on_cpu or (cpu_scratch_kept() and pixels <= STORED_PIXELS_MAX)
        remat = not store if self.remat is None else self.remat
        return remat, (on_cpu and remat) if self.scan is None else self.scan

    def resolved(self) -> "DQCConfig":
        """This config with `remat` and `scan` set as its loop's batches run here, so that a resumed run rounds
        the same."""
        remat, scan = self.block_execution(self.batch * self.patch**2)
        return dataclasses.replace(self, remat=remat, scan=scan)

    def optimizer(self) -> optax.GradientTransformation:
        lr = optax.cosine_decay_schedule(self.lr, self.steps) if self.cosine else self.lr
        return optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.eps)


def _update_scale(bounds, dqc: DQCConfig) -> Array | None:
    """The factor of each raveled bound's Adam update: weight_lr / lr on weight sites, 1 elsewhere (None: all 1)."""
    if dqc.weight_lr is None:
        return None
    factor = lambda path, b: jnp.full_like(b.lu, dqc.weight_lr / dqc.lr if is_weight_site(path) else 1.0)
    return ravel_pytree(nest_bounds({p: factor(p, b) for p, b in flat_bounds(bounds).items()}))[0]


def _per_sample_norm(f: Array) -> Array:
    """Detached Frobenius norm of each sample of (B, L, C), shaped (B, 1, 1, 1) as in the official code."""
    return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(f), axis=(1, 2)))).reshape(-1, 1, 1, 1)


def _broadcast_feature_sse(fq: Array, ff: Array) -> Array:
    """sum over a, b of ||fq_b / nq_a - ff_b / nf_a||^2: the official (B, B, L, C) broadcast, in O(B L C).

    With r_a = nq_a / nf_a, fq_b - r_a ff_b = d_b + (1 - r_a) ff_b for d = fq - ff, so the sum is
    sum_a (D + 2 (1 - r_a) E + (1 - r_a)^2 F) / nq_a^2 with D = ||d||^2, E = <d, ff>, F = ||ff||^2 over the
    batch. Differences are formed before squaring, so nothing cancels, and the norms stay detached as in PyTorch.
    """
    nq, nf = _per_sample_norm(fq).ravel(), _per_sample_norm(ff).ravel()
    d = fq - ff
    one_minus_r = (nf - nq) / nf
    sse = jnp.sum(jnp.square(d)) + 2 * one_minus_r * jnp.sum(d * ff) + jnp.square(one_minus_r) * jnp.sum(jnp.square(ff))
    return jnp.sum(sse / jnp.square(nq))


def official_loss(out_q, out_fp, feats_q, feats_fp) -> tuple[Array, dict]:
    batch = out_q.shape[0]
    pixel = jnp.mean(jnp.abs(out_q - out_fp)) / out_q.size * batch
    terms = {"pixel": pixel}
    for i, (fq, ff) in enumerate(zip(feats_q, feats_fp)):
        # The official code divides (B, L, C) features by (B, 1, 1, 1) norms, which PyTorch broadcasts to
        # (B, B, L, C); kept for parity, without materialising it. mean(.) / numel = sse / numel^2.
        numel = batch * fq.size
        terms[f"feature_{i}"] = 5.0 * _broadcast_feature_sse(fq, ff) / numel / numel
    return sum(terms.values()), terms


def paper_loss(out_q, out_fp, feats_q, feats_fp, feature_weight: float) -> tuple[Array, dict]:
    """The paper's loss as written: its norms are not detached (the official code's are), so the feature
    term's gradient is that of a scale-invariant function: orthogonal to each sample's features."""
    terms = {"pixel": jnp.mean(jnp.abs(out_q - out_fp))}
    for i, (fq, ff) in enumerate(zip(feats_q, feats_fp)):
        unit = lambda f: f / jnp.sqrt(jnp.sum(jnp.square(f), axis=(1, 2), keepdims=True))
        per_sample = jnp.sqrt(jnp.sum(jnp.square(unit(ff) - unit(fq)), axis=(1, 2))) / (fq.shape[1] * fq.shape[2])
        terms[f"feature_{i}"] = feature_weight * jnp.mean(per_sample)
    return sum(terms.values()), terms


def distillation_loss(bounds, params, images: Array, config: ModelConfig, dqc: DQCConfig) -> tuple[Array, dict]:
    """Loss of the fake-quant student against the FP teacher on `images` (B, H, W, C), computed in the images'
    dtype: float64 images (under `jax.enable_x64`) give the exact-arithmetic reference of a float32 run. The
    feature terms run over the model's stage features (`models`: 4 for SwinIR-light and NGswin alike)."""
    model = functools.partial(models.build, config, dtype=images.dtype)
    out_fp, feats_fp = model().apply({"params": params}, images)
    remat, scan = dqc.block_execution(math.prod(images.shape[:3]))
    student = model(site=quantized_site, remat=remat, scan=scan)
    out_q, feats_q = student.apply({"params": params, "bounds": bounds}, images)
    out_fp, feats_fp = jax.lax.stop_gradient((out_fp, feats_fp))
    if dqc.loss == "official":
        return official_loss(out_q, out_fp, feats_q, feats_fp)
    return paper_loss(out_q, out_fp, feats_q, feats_fp, dqc.feature_weight)


class DQCState(NamedTuple):
    """Everything a DQC run changes: the bounds, Adam's moments (over the raveled bounds), the step count."""

    bounds: dict
    opt_state: optax.OptState
    step: Array


def init_state(bounds, dqc: DQCConfig) -> DQCState:
    """The state a DQC run starts from: a copy of `bounds` (the caller's arrays stay theirs), Adam's zero
    moments and step 0."""
    bounds = jax.tree.map(jnp.copy, bounds)
    return DQCState(bounds, dqc.optimizer().init(ravel_pytree(bounds)[0]), jnp.zeros((), jnp.int32))


def dqc_step(config: ModelConfig, dqc: DQCConfig, state: DQCState, params, images: Array):
    """One Adam step on the bounds; returns the new state and the loss terms (before the update). Jitted, with
    `config` and `dqc` static; every argument stays valid (a loop that owns its state uses `donating_dqc_step`).

    Adam runs on the bounds raveled into one vector: the update of a site-by-site Adam (elementwise, equal
    up to float rounding), in a few kernels instead of several for each of the 384 sites, which a GPU runs
    as one tiny launch each."""
    flat, unravel = ravel_pytree(state.bounds)
    loss_of_flat = lambda flat: distillation_loss(unravel(flat), params, images, config, dqc)
    (loss, terms), grads = jax.value_and_grad(loss_of_flat, has_aux=True)(flat)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 step counts
        updates, opt_state = dqc.optimizer().update(grads, state.opt_state, flat)
    scale = _update_scale(state.bounds, dqc)
    updates = updates if scale is None else updates * scale
    bounds = unravel(optax.apply_updates(flat, updates))
    return DQCState(bounds, opt_state, state.step + 1), {"loss": loss, **terms}


# `dqc_step` that reuses the state's buffers for the new one, invalidating the state it is given.
donating_dqc_step = jax.jit(dqc_step, static_argnums=(0, 1), donate_argnums=2)
dqc_step = jax.jit(dqc_step, static_argnums=(0, 1))
