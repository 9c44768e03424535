"""Benchmark evaluation with the BasicSR / SwinIR protocol (spec section 6).

Whole-image inference (the model flip-pads to a multiple of the window and crops back, as 2DQuant's
`test()` does), output rounded to uint8, PSNR and SSIM on Y with `crop_border = scale`. Works for the FP
model (no bounds) and the fake-quantized model alike: both are `SwinIR(config, site=quantized_site)`.
"""

from __future__ import annotations

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
from jaxquant.quant import quantized_site
from jaxquant.swinir import SwinIR, SwinIRConfig


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: SwinIRConfig, variables, x):
    return SwinIR(config, site=quantized_site).apply(variables, x)[0]


def variables(model: Model) -> dict:
    return {"params": model.params} | ({"bounds": model.bounds} if model.bounds is not None else {})


def forward_compilations(model: Model, benchmarks: Mapping[str, Sequence[BenchmarkImage]]) -> list[Callable]:
    """One thunk per LR image shape in `benchmarks` that compiles `model`'s forward for it (see
    `compile_concurrently`); `super_resolve` then finds it compiled. A shape compiled before costs a cache
    lookup (~5 ms): the lowering and the executable are cached by the bounds' structure, not their values."""
    shapes = sorted({(1, *image.lr.shape) for images in benchmarks.values() for image in images})

    def compile_for(shape):
        return _forward.lower(model.config, variables(model), jax.ShapeDtypeStruct(shape, jnp.float32)).compile()

    return [functools.partial(compile_for, shape) for shape in shapes]


def compile_concurrently(compilations: Sequence[Callable]) -> None:
    """Run compile thunks at once, a thread each, and raise the first error. XLA compiles outside the GIL:
    on an accelerator host, where a forward takes ~20 s to compile per image shape (H100), they overlap."""
    if compilations:
        with ThreadPoolExecutor(max_workers=min(len(compilations), os.cpu_count() or 1)) as pool:
            for done in [pool.submit(compile_one) for compile_one in compilations]:
                done.result()


def super_resolve(model: Model, lr: np.ndarray) -> np.ndarray:
    """One uint8 HxWx3 LR image -> the model's float32 sHxsWx3 output, in [0, 1] up to overshoot."""
    x = jnp.asarray(lr, jnp.float32)[None] / 255.0
    return np.asarray(_forward(model.config, variables(model), x)[0])


def evaluate(
    model: Model, benchmarks: Mapping[str, Sequence[BenchmarkImage]], *, save_dir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, dict]:
    """Per-image and mean PSNR / SSIM (Y channel) of `model` on each benchmark (see `load_benchmarks`)."""
    compile_concurrently(forward_compilations(model, benchmarks))
    return {name: _evaluate_images(model, name, images, save_dir, show_progress) for name, images in benchmarks.items()}


def _evaluate_images(
    model: Model, name: str, images: Sequence[BenchmarkImage], save_dir: Path | None, show_progress: bool
) -> dict:
    scale = model.config.upscale
    per_image = {}
    for image in tqdm(images, desc=f"{name} x{scale}", unit="img", disable=not show_progress, leave=False):
        sr = to_uint8(super_resolve(model, image.lr))
        per_image[image.name] = {"psnr": psnr_y(sr, image.hr, scale), "ssim": ssim_y(sr, image.hr, scale)}
        if save_dir is not None:
            write_image(Path(save_dir) / name / f"{image.name}.png", sr)
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
