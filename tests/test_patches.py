"""Tests for jaxquant.patches: device-resident aligned LR/HR patch sampling."""

from __future__ import annotations

import itertools
import warnings

import jax
import numpy as np
import pytest

from jaxquant.data import imresize, write_image
from jaxquant.patches import bicubic_pairs, lr_pool_from_folder, make_pool, sample_patches

sample = jax.jit(sample_patches, static_argnums=(2, 3, 4))


def _block_mean(hr: np.ndarray, s: int) -> np.ndarray:
    """LR by an exact s x s mean, rounded half up: commutes with flips and transposes, unlike subsampling."""
    h, w, c = hr.shape
    return np.floor(hr.reshape(h // s, s, w // s, s, c).astype(np.float64).mean((1, 3)) + 0.5).astype(np.uint8)


def _pairs(shapes, s=2, seed=0):
    rng = np.random.default_rng(seed)
    hr = [rng.integers(0, 256, (h * s, w * s, 3), np.uint8) for h, w in shapes]
    return [_block_mean(img, s) for img in hr], hr


def _u8(x) -> np.ndarray:
    return np.rint(np.asarray(x) * 255.0).astype(np.uint8)


def test_same_key_same_batch_and_no_recompile():
    pool = make_pool(*_pairs([(12, 10), (9, 16)]), scale=2, min_size=8)
    before = sample._cache_size()
    a = sample(pool, jax.random.PRNGKey(0), 6, 8)
    b = sample(pool, jax.random.PRNGKey(0), 6, 8)
    c = sample(pool, jax.random.PRNGKey(1), 6, 8)
    assert sample._cache_size() - before == 1
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("augment", [False, True])
def test_hr_patch_matches_lr_patch(augment):
    s = 2
    pool = make_pool(*_pairs([(12, 10), (9, 16), (8, 8)], s), scale=s, min_size=8)
    lr, hr = sample(pool, jax.random.PRNGKey(3), 32, 8, augment)
    assert lr.shape == (32, 8, 8, 3) and hr.shape == (32, 16, 16, 3)
    assert lr.dtype == hr.dtype == np.float32
    for lr_patch, hr_patch in zip(_u8(lr), _u8(hr)):
        np.testing.assert_array_equal(_block_mean(hr_patch, s), lr_patch)


def _dihedral(patch: np.ndarray):
    """The 8 results of optional hflip, vflip, transpose, keyed by the flags."""
    for flags in itertools.product((False, True), repeat=3):
        p = patch[:, ::-1] if flags[0] else patch
        p = p[::-1] if flags[1] else p
        yield flags, (p.transpose(1, 0, 2) if flags[2] else p)


def _locate(patch: np.ndarray, image: np.ndarray, size: int):
    """(flags, top, left) of every crop-and-transform of `image` equal to `patch`."""
    h, w = image.shape[:2]
    return [
        (flags, top, left)
        for top in range(h - size + 1)
        for left in range(w - size + 1)
        for flags, p in _dihedral(image[top : top + size, left : left + size])
        if np.array_equal(p, patch)
    ]


@pytest.mark.parametrize("augment", [False, True])
def test_crops_cover_positions_and_transforms(augment):
    lr, _ = _pairs([(7, 9)], seed=1)  # random values: every crop-and-transform is unique
    pool = make_pool(lr, None, min_size=4)
    patches, hr = sample(pool, jax.random.PRNGKey(0), 256, 4, augment)
    assert hr is None
    found = [_locate(p, lr[0], 4) for p in _u8(patches)]
    assert all(len(f) == 1 for f in found)
    flags = {f[0][0] for f in found}
    positions = {f[0][1:] for f in found}
    assert flags == (set(itertools.product((False, True), repeat=3)) if augment else {(False, False, False)})
    assert positions == {(t, l) for t in range(4) for l in range(6)}  # every valid position, nothing in padding


def test_small_images_dropped_with_warning_and_none_left_is_an_error():
    lr, hr = _pairs([(12, 10), (5, 20)])
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        pool = make_pool(lr, hr, scale=2, min_size=8)
    assert pool.lr.shape == (1, 12, 10, 3) and pool.hr.shape == (1, 24, 20, 3)
    np.testing.assert_array_equal(pool.sizes, [[12, 10]])
    with pytest.raises(ValueError, match="no image has an LR side of at least 16"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_pool(lr, hr, scale=2, min_size=16)
    with pytest.raises(ValueError, match="patch size 9 exceeds"):
        sample_patches(pool, jax.random.PRNGKey(0), 2, 9)


def test_a_folder_without_large_enough_images_is_named(tmp_path):
    write_image(tmp_path / "small.png", np.zeros((40, 40, 3), np.uint8))  # LR 20x20 at x2
    with pytest.raises(ValueError, match=f"^{tmp_path}: no image has an LR side of at least 32 pixels"), \
            pytest.warns(UserWarning, match=f"^{tmp_path}: dropped 1 of 1 images"):
        lr_pool_from_folder(tmp_path, 2, min_size=32)


def test_mismatched_hr_is_an_error():
    lr, hr = _pairs([(12, 10)])
    with pytest.raises(ValueError, match="not 3 x LR shape"):
        make_pool(lr, hr, scale=3)
    with pytest.raises(ValueError, match="1 LR images but 2 HR"):
        make_pool(lr, hr * 2, scale=2)


def test_pool_from_folder_is_matlab_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in ((21, 30, 3), (32, 19, 3))]
    for i, img in enumerate(images):
        write_image(tmp_path / f"{i}.png", img)
    pool = lr_pool_from_folder(tmp_path, 3, min_size=6)
    np.testing.assert_array_equal(pool.sizes, [[7, 10], [10, 6]])
    assert pool.scale == 3
    lr, hr = bicubic_pairs(images, 3)
    for i, (lr_img, hr_img) in enumerate(zip(lr, hr)):
        np.testing.assert_array_equal(lr_img, imresize(images[i][: 3 * lr_img.shape[0], : 3 * lr_img.shape[1]], 1 / 3))
        np.testing.assert_array_equal(pool.lr[i, : lr_img.shape[0], : lr_img.shape[1]], lr_img)
        np.testing.assert_array_equal(pool.hr[i, : hr_img.shape[0], : hr_img.shape[1]], hr_img)


def test_lr_only_pool_draws_the_same_lr_patches(tmp_path):
    rng = np.random.default_rng(1)
    for i, shape in enumerate(((40, 33, 3), (27, 45, 3), (36, 36, 3))):
        write_image(tmp_path / f"{i}.png", rng.integers(0, 256, shape, np.uint8))
    paired = lr_pool_from_folder(tmp_path, 3, min_size=8)
    lr_only = lr_pool_from_folder(tmp_path, 3, min_size=8, keep_hr=False)
    assert lr_only.hr is None
    key = jax.random.PRNGKey(5)
    lr, hr = sample_patches(paired, key, 6, 8)
    lr_alone, no_hr = sample_patches(lr_only, key, 6, 8)
    assert hr.shape == (6, 24, 24, 3) and no_hr is None
    np.testing.assert_array_equal(lr_alone, lr)
