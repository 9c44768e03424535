"""Benchmark evaluation with the BasicSR / SwinIR protocol (spec section 6), each model under its own padding.

Whole-image inference (SwinIR flip-pads to a multiple of the window and crops back, as 2DQuant's `test()` does;
NGswin's input is padded symmetric to a multiple of 32 first, as its authors test: `models.Architecture.test_pad`),
output rounded to uint8, PSNR and SSIM on Y with `crop_border = scale`. Works for the FP model (no bounds) and the
fake-quantized model alike: both are `models.build(config, site=quantized_site)`; an `integer.IntegerModel` runs
the integer forward instead.

A benchmark of large images of many sizes (Urban100) is run in overlapping tiles instead, as SwinIR's
`main_test_swinir.py --tile --tile_overlap` does: every image shape compiles its own forward, and the compiled
forwards stay resident, so whole images would need more memory than a CPU host has (`Tiling`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxquant.checkpoint import Model
from jaxquant.data import BenchmarkImage, write_image
from jaxquant.metrics import psnr_y, ssim_y, to_uint8
from jaxquant import models, parallel
from jaxquant.models import ModelConfig
from jaxquant.integer import IntegerModel, IntegerSites
from jaxquant.quant import quantized_site
from jaxquant.swinir import SiteFn


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(config: ModelConfig, site: SiteFn, variables, x):
    """The model under its own test protocol (`models.Architecture.test_pad`), cropped to scale x the input."""
    _, h, w, _ = x.shape
    out = models.build(config, site=site).apply(variables, models.architecture(config).test_pad(config, x))[0]
    return out[:, : h * config.upscale, : w * config.upscale]


def forward_site(model: Model | IntegerModel) -> SiteFn:
    """The integer forward's sites for an `IntegerModel`; the fake quantizer's otherwise (FP without bounds)."""
    return IntegerSites() if isinstance(model, IntegerModel) else quantized_site


def variables(model: Model) -> dict:
    return {"params": model.params} | ({"bounds": model.bounds} if model.bounds is not None else {})


# Resident memory that one compiled whole-image forward keeps per LR pixel of its image shape (SwinIR-light,
# fake-quantized or not; measured as peak resident memory over Urban100's shapes, see docs/measurements.md).
RESIDENT_BYTES_PER_LR_PIXEL = 4096
WHOLE_IMAGE_BUDGET = 4 * 2**30  # whole-image forwards of one benchmark may keep this much; beyond it, tiles
DEFAULT_TILE, DEFAULT_OVERLAP = 128, 32  # LR pixels: a multiple of every window; SwinIR's default overlap


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Whole images, or `tile` x `tile` LR tiles overlapping by `overlap` pixels (SwinIR's test script).

    `tile=None` chooses per benchmark: whole images unless their compiled forwards (one per image shape)
    would keep more than `WHOLE_IMAGE_BUDGET` resident, then `DEFAULT_TILE`. `tile=0` always runs whole images.
    """

    tile: int | None = None
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self):
        if self.overlap < 0 or (self.tile is not None and self.tile < 0):
            raise ValueError(f"tile and tile overlap must be >= 0, got {self.tile} and {self.overlap}")
        if self.tile and self.tile <= self.overlap:
            raise ValueError(f"the tile ({self.tile}) must be larger than its overlap ({self.overlap})")

    def tile_for(self, images: Sequence[BenchmarkImage]) -> int:
        """The tile size for a benchmark, 0 for whole images."""
        if self.tile is not None:
            return self.tile
        return DEFAULT_TILE if whole_image_memory(images) > WHOLE_IMAGE_BUDGET else 0


def whole_image_memory(images: Sequence[BenchmarkImage]) -> int:
    """Bytes the compiled whole-image forwards for `images` keep resident: one per distinct LR shape."""
    return RESIDENT_BYTES_PER_LR_PIXEL * sum(h * w for h, w, _ in {image.lr.shape for image in images})


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along an axis of `size` pixels: every `tile - overlap`, the last flush with the end
    (SwinIR's `h_idx_list`). A tile larger than the axis is cut to it."""
    tile = min(tile, size)
    return [*range(0, size - tile, tile - overlap), size - tile]


def tiled(forward: Callable[[jax.Array], jax.Array], scale: int, tile: int, overlap: int) -> Callable:
    """`forward` (an LR batch (B, H, W, C) -> its x`scale` SR batch) run tile by tile, the SR tiles averaged
    where they overlap. Every tile of an image at least `tile` pixels high and wide has one shape, so one
    compiled forward serves a whole benchmark; the SR image is assembled on the host."""

    def run(lr: jax.Array) -> np.ndarray:
        _, h, w, _ = lr.shape
        th, tw = min(tile, h), min(tile, w)
        total, count = None, np.zeros((1, h * scale, w * scale, 1), np.float32)
        for y in tile_starts(h, tile, overlap):
            for x in tile_starts(w, tile, overlap):
                sr = np.asarray(forward(lr[:, y:y + th, x:x + tw]))
                if total is None:
                    total = np.zeros((sr.shape[0], h * scale, w * scale, sr.shape[-1]), np.float32)
                region = np.s_[:, y * scale:(y + th) * scale, x * scale:(x + tw) * scale]
                total[region] += sr
                count[region] += 1
        return total / count

    return run


def forward_shapes(benchmarks: Mapping[str, Sequence[BenchmarkImage]], tiling: Tiling) -> set[tuple[int, ...]]:
    """The input shapes the forward is called with: each LR image's, or its tile's where a benchmark is tiled."""
    shapes = set()
    for images in benchmarks.values():
        tile = tiling.tile_for(images)
        shapes |= {(1, min(tile, h), min(tile, w), c) if tile else (1, h, w, c) for h, w, c in
                   (image.lr.shape for image in images)}
    return shapes


def forward_compilations(
    model: Model, benchmarks: Mapping[str, Sequence[BenchmarkImage]], tiling: Tiling = Tiling(),
    devices: Sequence[jax.Device] | None = None,
) -> list[Callable]:
    """One thunk per input shape that evaluating `benchmarks` with `tiling` calls `model`'s forward with, which
    compiles it for that shape (see `compile_concurrently`); `super_resolve` then finds it compiled. A shape
    compiled before costs a cache lookup (~5 ms): the lowering and the executable are cached by the bounds'
    structure, not their values. With `devices`, one per shape and device, for `model`'s copy there (`evaluate`)."""
    shapes = sorted(forward_shapes(benchmarks, tiling))

    def compile_for(shape, copy):
        args = (copy.config, forward_site(copy), variables(copy), jax.ShapeDtypeStruct(shape, jnp.float32))
        return _forward.lower(*args).compile()

    return [functools.partial(compile_for, shape, copy) for copy in copies(model, devices) for shape in shapes]


def copies(model: Model | IntegerModel, devices: Sequence[jax.Device] | None) -> list:
    """`model` with its arrays on each of `devices` (None: `model` as it is)."""
    if devices is None:
        return [model]
    return [model._replace(params=parallel.to_device(model.params, d), bounds=parallel.to_device(model.bounds, d))
            for d in devices]


def compile_concurrently(compilations: Sequence[Callable]) -> None:
    """Run compile thunks at once, a thread each, and raise the first error. XLA compiles outside the GIL:
    on an accelerator host, where a forward takes ~20 s to compile per image shape (H100), they overlap."""
    if compilations:
        with ThreadPoolExecutor(max_workers=min(len(compilations), os.cpu_count() or 1)) as pool:
            for done in [pool.submit(with_matmul_precision_here(compile_one)) for compile_one in compilations]:
                done.result()


def with_matmul_precision_here(fn: Callable) -> Callable:
    """`fn`, to be run on another thread under this thread's matmul precision. The setting is thread-local in
    a `jax.default_matmul_precision` block, and a program compiled without it is not the one this thread calls."""
    precision = jax.config.jax_default_matmul_precision

    def run(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return run


def super_resolve(model: Model, lr: np.ndarray, tile: int = 0, overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """One uint8 HxWx3 LR image -> the model's float32 sHxsWx3 output, in [0, 1] up to overshoot; whole, or in
    `tile` x `tile` tiles overlapping by `overlap` (see `tiled`)."""
    x = jnp.asarray(lr, jnp.float32)[None] / 255.0
    forward = functools.partial(_forward, model.config, forward_site(model), variables(model))
    if tile:
        forward = tiled(forward, model.config.upscale, tile, overlap)
    return np.asarray(forward(x)[0])


def evaluate(
    model: Model, benchmarks: Mapping[str, Sequence[BenchmarkImage]], *, tiling: Tiling = Tiling(),
    save_dir: Path | None = None, show_progress: bool = True, devices: Sequence[jax.Device] | None = None,
) -> dict[str, dict]:
    """Per-image and mean PSNR / SSIM (Y channel) of `model` on each benchmark (see `load_benchmarks`), whole
    images or tiled as `tiling` says; a benchmark that `tiling` tiles by itself is named on stdout.

    With `devices` (a mesh's local devices), `model` is copied to each, and images (of any shape, so not one
    batch) run one a device at a time, each device's from its own thread; every image's result is the one
    device's."""
    placed = copies(model, devices)
    compile_concurrently(forward_compilations(model, benchmarks, tiling, devices))
    return {name: _evaluate_images(placed, name, images, tiling, save_dir, show_progress)
            for name, images in benchmarks.items()}


def _evaluate_images(
    placed: Sequence[Model], name: str, images: Sequence[BenchmarkImage], tiling: Tiling, save_dir: Path | None,
    show_progress: bool,
) -> dict:
    scale = placed[0].config.upscale
    tile = tiling.tile_for(images)
    if tile and tiling.tile is None:
        print(f"{name} x{scale}: whole images would keep ~{whole_image_memory(images) / 2**30:.1f} GiB of compiled "
              f"forwards (over {WHOLE_IMAGE_BUDGET / 2**30:.0f} GiB); running {tile}x{tile} tiles overlapping by "
              f"{tiling.overlap} (--tile 0 for whole images)")
    per_image = {}
    run = with_matmul_precision_here(lambda copy, image: to_uint8(super_resolve(copy, image.lr, tile, tiling.overlap)))
    with (tqdm(total=len(images), desc=f"{name} x{scale}", unit="img", disable=not show_progress, leave=False) as bar,
          ThreadPoolExecutor(max_workers=len(placed)) as threads):
        # One device inline: XLA:CPU keeps its scratch only for the main thread (`cpu_memory`).
        mapped = map if len(placed) == 1 else threads.map
        for first in range(0, len(images), len(placed)):
            group = images[first:first + len(placed)]
            for image, sr in zip(group, mapped(run, placed, group)):
                per_image[image.name] = {"psnr": psnr_y(sr, image.hr, scale), "ssim": ssim_y(sr, image.hr, scale)}
                if save_dir is not None:
                    write_image(Path(save_dir) / name / f"{image.name}.png", sr)
                bar.update()
    return {
        "psnr": float(np.mean([r["psnr"] for r in per_image.values()])),
        "ssim": float(np.mean([r["ssim"] for r in per_image.values()])),
        "images": per_image,
    }


def results_table(rows: Mapping[str, Mapping[str, dict]], datasets: Sequence[str]) -> str:
    """A Markdown table: one row per model, 'PSNR / SSIM' per dataset."""
    header = "| model | " + " | ".join(datasets) + " |"
    lines = [header, "|" + "---|" * (len(datasets) + 1)]
    for name, results in rows.items():
        cells = [f"{results[d]['psnr']:.3f} / {results[d]['ssim']:.4f}" if d in results else "-" for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
