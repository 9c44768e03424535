"""Comparison grids, the way the paper shows its results: the same crop of a few benchmark images, one
column per method (HR, bicubic, then each model), each tile labelled with the method and its PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxquant.checkpoint import Model
from jaxquant.data import BenchmarkImage, imresize, write_image
from jaxquant.evaluation import super_resolve
from jaxquant.metrics import psnr_y, to_uint8

LABEL_HEIGHT = 14


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top : top + size, left : left + size]


def labelled(tile: np.ndarray, text: str) -> np.ndarray:
    """The tile with a black strip of white text above it."""
    canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + LABEL_HEIGHT))
    canvas.paste(Image.fromarray(tile), (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def comparison_grid(
    models: Mapping[str, Model], images: Sequence[BenchmarkImage], path: Path, crop: int = 96, zoom: int = 2
) -> Path:
    """Write a PNG grid: rows are `images`, columns HR, Bicubic and each of `models` (name -> model)."""
    rows = []
    for image in images:
        scale = image.hr.shape[0] // image.lr.shape[0]
        outputs = {"HR": image.hr, "Bicubic": imresize(image.lr, scale)}
        outputs |= {name: to_uint8(super_resolve(model, image.lr)) for name, model in models.items()}
        size = min(crop, *image.hr.shape[:2])
        tiles = []
        for name, sr in outputs.items():
            label = name if name == "HR" else f"{name} {psnr_y(sr, image.hr, scale):.2f}dB"
            tile = center_crop(sr, size).repeat(zoom, 0).repeat(zoom, 1)
            tiles.append(labelled(tile, label))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    write_image(path, grid)
    return path
