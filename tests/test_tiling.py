"""Tiled inference (`jaxquant.evaluation.tiled`, SwinIR's `--tile --tile_overlap`): tile positions, exact
assembly for a local forward, agreement with whole-image SwinIR away from the seams, lower peak memory, and
when evaluation tiles by itself."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA_ROOT
from jaxquant.data import BenchmarkImage, load_benchmark
from jaxquant.evaluation import (
    DEFAULT_TILE, RESIDENT_BYTES_PER_LR_PIXEL, WHOLE_IMAGE_BUDGET, Tiling, forward_shapes, super_resolve,
    tile_starts, tiled,
)
from test_convert import run_script


def test_tile_starts_step_by_tile_minus_overlap_and_end_flush():
    assert tile_starts(256, 128, 32) == [0, 96, 128]
    assert tile_starts(224, 128, 32) == [0, 96]
    assert tile_starts(128, 128, 32) == [0]
    assert tile_starts(100, 128, 32) == [0]  # a tile larger than the image is cut to it
    assert tile_starts(10, 4, 0) == [0, 4, 6]


def seam_distance(size: int, tile: int, overlap: int) -> np.ndarray:
    """Per LR row (or column): distance in pixels to the nearest tile border inside the image."""
    borders = {b for start in tile_starts(size, tile, overlap) for b in (start, start + tile)} - {0, size}
    return np.array([min(abs(i + 0.5 - b) for b in borders) - 0.5 for i in range(size)])


def away_from_seams(h: int, w: int, tile: int, overlap: int, scale: int, margin: int) -> np.ndarray:
    """SR-pixel mask of the LR pixels at least `margin` pixels from every inner tile border."""
    lr = np.minimum.outer(seam_distance(h, tile, overlap), seam_distance(w, tile, overlap)) >= margin
    return lr.repeat(scale, 0).repeat(scale, 1)


def local_forward(x):
    """x2 nearest upsampling of a 3x3 box filter: each output depends on the input 1 pixel around it."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    box = sum(padded[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    return box.repeat(2, 1).repeat(2, 2)


def test_a_local_forward_tiled_equals_whole_beyond_its_reach():
    x = jnp.asarray(np.random.default_rng(0).random((2, 37, 50, 3), np.float32))
    whole, tiles = np.asarray(local_forward(x)), tiled(local_forward, 2, 16, 5)(x)
    assert tiles.shape == whole.shape
    far = away_from_seams(37, 50, 16, 5, 2, margin=1)
    np.testing.assert_allclose(tiles[:, far], whole[:, far], atol=1e-6)
    assert np.abs(tiles - whole)[:, ~far].max() > 1e-3  # the seams are where the edge padding shows


def test_tiled_swinir_agrees_with_whole_images_away_from_the_seams(t291_model):
    # Tiles of 48 overlapping by 16 on a 96x96 LR crop of Set5's baby at x2. Whole-image SwinIR sees
    # the image around every tile: the tiled output differs by up to ~0.1 at the seams, by at most 3.6e-4
    # (measured) 8 or more LR pixels from every inner tile border. Bound: 1e-3, a quarter of a uint8 level.
    lr = load_benchmark(DATA_ROOT, "Set5", 2)[0].lr[:96, :96]
    model = t291_model(2)
    whole, tiles = super_resolve(model, lr), super_resolve(model, lr, tile=48, overlap=16)
    far = away_from_seams(96, 96, 48, 16, 2, margin=8)
    assert far.mean() == 0.25
    assert np.abs(tiles - whole)[far].max() < 1e-3
    assert np.abs(tiles - whole).mean() < 2e-3


# A fresh process runs a small SwinIR on one 512x512 LR image, whole or in 64x64 tiles, and prints its peak
# resident memory and what XLA says the whole-image forward's temporaries take. The peak is the address space's
# (VmHWM), which starts afresh at exec: getrusage's ru_maxrss keeps the forking parent's (a pytest worker's GBs).
PEAK_MEMORY = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxquant.evaluation import tiled
from jaxquant.swinir import SwinIR, SwinIRConfig
model = SwinIR(SwinIRConfig(upscale=2, embed_dim=16, depths=(2,), num_heads=(2,), window_size=8))
x = jnp.asarray(np.random.default_rng(0).random((1, 512, 512, 3), np.float32))
params = model.init(jax.random.PRNGKey(0), x[:, :8, :8])
forward = jax.jit(lambda x: model.apply(params, x)[0])
temp = forward.lower(x).compile().memory_analysis().temp_size_in_bytes
if sys.argv[1] == "tiled":
    forward = tiled(forward, 2, 64, 16)
np.asarray(forward(x))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak * 1024, "temp": temp}))
"""


def test_tiling_lowers_peak_memory():
    measured = {}
    for mode in ("whole", "tiled"):
        result = run_script("-c", PEAK_MEMORY, mode)
        assert result.returncode == 0, result.stderr[-2000:]
        measured[mode] = json.loads(result.stdout.splitlines()[-1])
    saved, temp = measured["whole"]["peak"] - measured["tiled"]["peak"], measured["whole"]["temp"]
    # The tiles' temporaries are 1/64 of the whole image's: at least half of the whole image's must be saved.
    assert saved > 0.5 * temp, f"peak {measured}: saved {saved / 2**20:.0f} MiB of {temp / 2**20:.0f} MiB"


def images(*lr_shapes):
    return [BenchmarkImage(f"{i}", np.zeros((h * 2, w * 2, 3), np.uint8), np.zeros((h, w, 3), np.uint8))
            for i, (h, w) in enumerate(lr_shapes)]


def test_evaluation_tiles_by_itself_only_past_the_budget():
    side = int((WHOLE_IMAGE_BUDGET / RESIDENT_BYTES_PER_LR_PIXEL / 4) ** 0.5)  # four shapes of this fill it
    fits = images(*[(side, side - i) for i in range(4)])
    too_many = images(*[(side, side + i) for i in range(4)])
    assert Tiling().tile_for(fits) == 0 and Tiling().tile_for(too_many) == DEFAULT_TILE
    assert Tiling(tile=0).tile_for(too_many) == 0 and Tiling(tile=64).tile_for(fits) == 64
    # One compiled forward per tile shape instead of one per image shape (a side below the tile keeps its
    # size), per benchmark: B fits whole.
    small = images((40, 300))
    assert forward_shapes({"A": too_many, "B": small}, Tiling()) == {(1, DEFAULT_TILE, DEFAULT_TILE, 3), (1, 40, 300, 3)}
    assert forward_shapes({"A": too_many, "B": small}, Tiling(tile=64)) == {(1, 64, 64, 3), (1, 40, 64, 3)}


@pytest.mark.parametrize("tile, overlap", [(-1, 0), (32, 32), (16, 40), (8, -1)])
def test_bad_tiling_is_refused(tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        Tiling(tile, overlap)
