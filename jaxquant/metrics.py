"""Y-channel PSNR / SSIM with BasicSR conventions (numpy only).

Ports BasicSR `basicsr/metrics/psnr_ssim.py` (`calculate_psnr`, `calculate_ssim`, `_ssim` with
`test_y_channel=True`) and the Y conversion of `basicsr/utils/color_util.py` (`to_y_channel`,
`bgr2ycbcr(..., y_only=True)`), including its float32 intermediates, so the numbers match
BasicSR's; MSE and SSIM are computed in float64 as there. Images are uint8-range (0..255)
HxWx3 RGB, or HxW / HxWx1 grayscale (used as Y).
"""

from __future__ import annotations

import numpy as np

# BT.601 "studio swing" luma of [0, 1] inputs, in BasicSR's BGR order so float sums match.
_BGR_TO_Y = np.array([24.966, 128.553, 65.481])
_SSIM_WINDOW_SIZE = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, as BasicSR `tensor2img`: clamp, then (x * 255).round()."""
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def rgb_to_y(img: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """Luma Y (HxW float64) of an RGB image with values in [0, max_value], in that same range.

    For max_value=255 this is BasicSR `to_y_channel` bit for bit: Y = 16 + 65.481 R + 128.553 G
    + 24.966 B on [0, 1] RGB, scaled back by 255 (so Y lies in [16, 235]), with BasicSR's float32
    intermediate roundings. Grayscale is only normalised and scaled back, as in BasicSR.
    """
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim != 2 and (img.ndim != 3 or img.shape[2] != 3):
        raise ValueError(f"expected HxW, HxWx1 or HxWx3 image, got shape {img.shape}")
    max_value = float(max_value)  # a Python float keeps the arithmetic below in float32
    unit = img.astype(np.float32) / max_value
    if img.ndim == 3:
        # bgr2ycbcr on float32 input: luma in float64, returned in [0, 1] as float32
        luma = np.dot(unit[:, :, ::-1], _BGR_TO_Y) + 16.0
        unit = (luma / 255.0).astype(np.float32)
    return (unit * max_value).astype(np.float64)


def _cropped_y_pair(
    sr: np.ndarray, hr: np.ndarray, crop_border: int
) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        sr = sr[crop_border:-crop_border, crop_border:-crop_border]
        hr = hr[crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(sr), rgb_to_y(hr)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) on Y after cropping `crop_border` pixels per side; inf for identical images."""
    sr_y, hr_y = _cropped_y_pair(sr, hr, crop_border)
    mse = np.mean((sr_y - hr_y) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _gaussian_kernel_1d() -> np.ndarray:
    """cv2.getGaussianKernel(11, 1.5): sampled Gaussian normalised to sum 1."""
    offsets = np.arange(_SSIM_WINDOW_SIZE) - (_SSIM_WINDOW_SIZE - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    return kernel / kernel.sum()


def _gaussian_filter_valid(img: np.ndarray) -> np.ndarray:
    """11x11 Gaussian filter, 'valid' part only.

    Equals BasicSR's `cv2.filter2D(img, -1, window)[5:-5, 5:-5]`: cropping 5 px removes every
    output that touched cv2's border padding, and the window is separable (outer product).
    """
    kernel = _gaussian_kernel_1d()
    windows = np.lib.stride_tricks.sliding_window_view
    rows = windows(img, _SSIM_WINDOW_SIZE, axis=0) @ kernel
    return windows(rows, _SSIM_WINDOW_SIZE, axis=1) @ kernel


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """SSIM on Y after cropping `crop_border` pixels per side (BasicSR `_ssim`)."""
    x, y = _cropped_y_pair(sr, hr, crop_border)
    if min(x.shape) < _SSIM_WINDOW_SIZE:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {x.shape}")
    mu_x, mu_y = _gaussian_filter_valid(x), _gaussian_filter_valid(y)
    var_x = _gaussian_filter_valid(x * x) - mu_x**2
    var_y = _gaussian_filter_valid(y * y) - mu_y**2
    cov_xy = _gaussian_filter_valid(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov_xy + _SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )
    return float(ssim_map.mean())
