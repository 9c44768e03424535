"""Tests for jaxquant.metrics against hand-computed values of the BasicSR formulas."""

import math

import numpy as np
import pytest

from jaxquant.metrics import psnr_y, rgb_to_y, ssim_y, to_uint8

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def _random_rgb(seed, shape=(40, 48, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _noisy(img, sigma, seed):
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- conversions


def test_rgb_to_y_known_colours():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    expected = [16, 16 + 219, 16 + 65.481, 16 + 128.553, 16 + 24.966]
    np.testing.assert_allclose(rgb_to_y(colours.astype(np.uint8))[0], expected, atol=1e-4)
    in_unit_range = rgb_to_y(colours / 255.0, max_value=1.0)[0]
    np.testing.assert_allclose(in_unit_range, np.array(expected) / 255, atol=1e-6)


def test_rgb_to_y_grayscale_passes_through():
    gray = np.array([[3, 200], [17, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_y(gray), gray.astype(np.float64))
    np.testing.assert_array_equal(rgb_to_y(gray[:, :, None]), gray.astype(np.float64))


def test_to_uint8_clamps_then_rounds():
    values = np.array([-0.2, 0.0, 0.25, 0.5, 1.0, 1.7])
    # 0.25 * 255 = 63.75 -> 64; 0.5 * 255 = 127.5 -> 128 (round half to even, like torch)
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 64, 128, 255, 255])
    assert to_uint8(values).dtype == np.uint8


# --------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf():
    img = _random_rgb(0)
    assert psnr_y(img, img.copy(), crop_border=2) == math.inf


def test_psnr_gray_offset_of_one():
    hr = np.full((20, 20), 100, dtype=np.uint8)
    assert psnr_y(hr + 1, hr, crop_border=0) == pytest.approx(10 * math.log10(255**2 / 1.0))


def test_psnr_rgb_offset_of_one_per_channel():
    # +1 on R, G and B moves Y by (65.481 + 128.553 + 24.966) / 255 = 219 / 255 everywhere.
    hr = _random_rgb(1).clip(0, 254)
    expected = 10 * math.log10(255**2 / (219 / 255) ** 2)
    assert psnr_y(hr + 1, hr, crop_border=4) == pytest.approx(expected, abs=1e-3)


def test_psnr_mixed_errors_by_hand():
    # Gray: Y is the value itself. Errors 0, 2, 4, 6 over four pixels: MSE = (0+4+16+36)/4 = 14.
    hr = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    sr = hr + np.array([[0, 2], [4, 6]], dtype=np.uint8)
    assert psnr_y(sr, hr, crop_border=0) == pytest.approx(10 * math.log10(255**2 / 14))


def test_psnr_ignores_border_pixels():
    hr = _random_rgb(2)
    sr = _noisy(hr, 5, seed=3)
    changed_border = sr.copy()
    changed_border[:3] = 0
    changed_border[:, -3:] = 255
    assert psnr_y(changed_border, hr, crop_border=3) == psnr_y(sr, hr, crop_border=3)
    assert psnr_y(changed_border, hr, crop_border=2) < psnr_y(sr, hr, crop_border=2)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), 0)


# --------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one():
    img = _random_rgb(4)
    assert ssim_y(img, img.copy(), crop_border=2) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_by_hand():
    # No variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) at every position.
    a, b = 100, 110
    expected = (2 * a * b + C1) / (a**2 + b**2 + C1)
    result = ssim_y(np.full((16, 16), a, np.uint8), np.full((16, 16), b, np.uint8), crop_border=0)
    assert result == pytest.approx(expected, rel=1e-12)


def _reference_ssim(x, y):
    """Direct 2-D SSIM: one explicit 11x11 Gaussian window per valid position."""
    offsets = np.arange(11) - 5.0
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * px * px).sum() - mx**2
            vy = (window * py * py).sum() - my**2
            cxy = (window * px * py).sum() - mx * my
            numerator = (2 * mx * my + C1) * (2 * cxy + C2)
            values.append(numerator / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    return np.mean(values)


def test_ssim_matches_direct_window_computation():
    hr = _random_rgb(5, shape=(15, 17))
    sr = _noisy(hr, 20, seed=6)
    expected = _reference_ssim(hr.astype(np.float64), sr.astype(np.float64))
    assert ssim_y(hr, sr, crop_border=0) == pytest.approx(expected, rel=1e-10)


def test_ssim_drops_with_noise():
    yy, xx = np.mgrid[0:64, 0:64]
    hr = np.stack([(yy * 3) % 256, (xx * 4) % 256, ((xx + yy) * 2) % 256], axis=2).astype(np.uint8)
    slight, heavy = ssim_y(_noisy(hr, 3, 7), hr, 4), ssim_y(_noisy(hr, 30, 7), hr, 4)
    assert 1.0 > slight > heavy
    assert heavy < 0.8


def test_ssim_ignores_border_pixels():
    hr = _random_rgb(8)
    sr = _noisy(hr, 10, seed=9)
    changed_border = sr.copy()
    changed_border[-4:] = 0
    changed_border[:, :4] = 255
    assert ssim_y(changed_border, hr, crop_border=4) == ssim_y(sr, hr, crop_border=4)
    assert ssim_y(changed_border, hr, crop_border=0) < ssim_y(sr, hr, crop_border=0)


def test_ssim_rejects_too_small_images():
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(np.zeros((14, 14), np.uint8), np.zeros((14, 14), np.uint8), crop_border=2)
