"""Device-resident random patch sampling for training (FP SwinIR) and DQC.

Replaces the PyTorch `DataLoader` of BasicSR `basicsr/data/paired_image_dataset.py` (`paired_random_crop`,
`augment` with hflip / vflip / rot90-as-transpose) with a pure, jittable function: the images live on the
device as one zero-padded uint8 array plus their sizes, and `sample_patches(pool, key, ...)` draws a batch
with `lax.dynamic_slice`, so a training step needs no host round trip. Same key, same batch.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.data import imresize, list_images, modcrop, read_image

Array = jax.Array


@flax.struct.dataclass
class PatchPool:
    """Images packed for sampling. `lr`: (N, H, W, C) uint8, zero-padded; `sizes`: (N, 2) int32 true LR
    (height, width); `hr`: (N, sH, sW, C) uint8 aligned with `lr`, or None. `scale` and `min_size` (every
    image's LR side is at least this) are static."""

    lr: Array
    sizes: Array
    hr: Array | None
    scale: int = flax.struct.field(pytree_node=False)
    min_size: int = flax.struct.field(pytree_node=False)


def _pad_stack(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, max H, max W, C) uint8, each image at the top left, zeros elsewhere."""
    height = max(img.shape[0] for img in images)
    width = max(img.shape[1] for img in images)
    out = np.zeros((len(images), height, width, images[0].shape[2]), np.uint8)
    for i, img in enumerate(images):
        out[i, : img.shape[0], : img.shape[1]] = img
    return out


def make_pool(
    lr_images: Sequence[np.ndarray],
    hr_images: Sequence[np.ndarray] | None = None,
    scale: int = 1,
    *,
    min_size: int = 1,
    source: str | Path | None = None,
) -> PatchPool:
    """Pack uint8 HxWxC LR images (and HR images of exactly `scale` x their size) into a `PatchPool`.

    Images with an LR side under `min_size` (the largest patch you will sample) are dropped with a warning;
    the warning and the error where none is left name `source`, the folder the images came from, if given.
    """
    if hr_images is not None and len(hr_images) != len(lr_images):
        raise ValueError(f"{len(lr_images)} LR images but {len(hr_images)} HR images")
    for i, lr in enumerate(lr_images):
        if lr.dtype != np.uint8 or lr.ndim != 3:
            raise ValueError(f"image {i}: expected uint8 HxWxC, got {lr.dtype} {lr.shape}")
        if hr_images is not None and hr_images[i].shape != (lr.shape[0] * scale, lr.shape[1] * scale, lr.shape[2]):
            raise ValueError(f"image {i}: HR shape {hr_images[i].shape} is not {scale} x LR shape {lr.shape}")
    keep = [i for i, lr in enumerate(lr_images) if min(lr.shape[:2]) >= min_size]
    where = f"{source}: " if source else ""
    if len(keep) < len(lr_images):
        dropped = len(lr_images) - len(keep)
        warnings.warn(f"{where}dropped {dropped} of {len(lr_images)} images with an LR side under {min_size}",
                      stacklevel=2)
    if not keep:
        raise ValueError(f"{where}no image has an LR side of at least {min_size} pixels (of {len(lr_images)} images)")
    return PatchPool(
        lr=jnp.asarray(_pad_stack([lr_images[i] for i in keep])),
        sizes=jnp.asarray([lr_images[i].shape[:2] for i in keep], jnp.int32),
        hr=None if hr_images is None else jnp.asarray(_pad_stack([hr_images[i] for i in keep])),
        scale=scale,
        min_size=min_size,
    )


def bicubic_pairs(hr_images: Sequence[np.ndarray], scale: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(LR, HR) lists: HR modcropped to a multiple of `scale`, LR = MATLAB-bicubic downscale of it."""
    hr = [modcrop(img, scale) for img in hr_images]
    return [imresize(img, 1 / scale) for img in hr], hr


def lr_pool_from_folder(folder: str | Path, scale: int, *, min_size: int = 1, keep_hr: bool = True) -> PatchPool:
    """The pool of (bicubic LR, HR) pairs made from the HR images in `folder` (see `bicubic_pairs`).

    `keep_hr=False` packs the LR images alone (DQC distils from the FP model and never reads HR), which keeps
    the HR images, `scale`^2 times larger, off the device."""
    lr, hr = bicubic_pairs([read_image(p) for p in list_images(folder)], scale)
    return make_pool(lr, hr if keep_hr else None, scale, min_size=min_size, source=folder)


def _augment(patch: Array, flips: Array) -> Array:
    """hflip, vflip, transpose of an (S, S, C) patch, each applied where its flag in `flips` (3,) is set."""
    patch = jnp.where(flips[0], patch[:, ::-1], patch)
    patch = jnp.where(flips[1], patch[::-1], patch)
    return jnp.where(flips[2], patch.transpose(1, 0, 2), patch)


def _sample_one(pool: PatchPool, key: Array, lr_size: int, augment: bool) -> tuple[Array, Array | None]:
    k_image, k_top, k_left, k_flips = jax.random.split(key, 4)
    i = jax.random.randint(k_image, (), 0, pool.lr.shape[0])
    top = jax.random.randint(k_top, (), 0, pool.sizes[i, 0] - lr_size + 1)
    left = jax.random.randint(k_left, (), 0, pool.sizes[i, 1] - lr_size + 1)
    flips = jax.random.bernoulli(k_flips, 0.5, (3,)) & augment

    def crop(images: Array, s: int) -> Array:  # (N, H, W, C) -> (s*lr_size, s*lr_size, C) in [0, 1]
        start = (i, top * s, left * s, jnp.zeros((), jnp.int32))
        patch = jax.lax.dynamic_slice(images, start, (1, lr_size * s, lr_size * s, images.shape[3]))[0]
        return _augment(patch, flips).astype(jnp.float32) / 255.0

    return crop(pool.lr, 1), None if pool.hr is None else crop(pool.hr, pool.scale)


@functools.partial(jax.jit, static_argnames=("batch", "lr_size", "augment", "rows"))
def sample_patches(
    pool: PatchPool, key: Array, batch: int, lr_size: int, augment: bool = True, rows: tuple[int, int] | None = None
) -> tuple[Array, Array | None]:
    """`batch` random aligned crops: LR (B, lr_size, lr_size, C) and HR (B, s*lr_size, s*lr_size, C) or None.
    Given `rows` `(start, stop)`, only those rows of that batch (a process's share: `parallel.process_rows`).

    Float32 in [0, 1]. Each crop takes a uniformly random image, a uniformly random position inside it, and
    (with `augment`) random hflip / vflip / transpose, the same on LR and HR. Jitted (`batch`, `lr_size` and
    `augment` static): called eagerly from a Python loop, the vmapped crops cost 11-21 ms a batch on a CPU.
    """
    if lr_size > pool.min_size:
        raise ValueError(f"patch size {lr_size} exceeds the pool's guaranteed image side {pool.min_size}")
    keys = jax.random.split(key, batch)[slice(*rows or (0, batch))]
    return jax.vmap(lambda k: _sample_one(pool, k, lr_size, augment))(keys)
