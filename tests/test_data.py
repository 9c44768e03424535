"""Tests for jaxquant.data: image I/O, MATLAB-bicubic imresize, benchmarks, patch sampling."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxquant.data import (
    BenchmarkImage,
    check_output_path,
    default_data_root,
    imresize,
    list_images,
    load_benchmark,
    modcrop,
    read_image,
    resolve_data_root,
    write_image,
)

DATA_ROOT = default_data_root()
needs_data = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"no data root at {DATA_ROOT}")


def _lr_folders() -> list[Path]:
    return sorted(DATA_ROOT.glob("benchmark/*/LR_bicubic/X*")) if DATA_ROOT.is_dir() else []


# --------------------------------------------------------------------------- imresize vs LR files


@needs_data
def test_benchmark_has_lr_files_to_check():
    assert _lr_folders(), f"no benchmark/*/LR_bicubic/X* folders under {DATA_ROOT}"


def _lr_folder_id(folder: Path) -> str:
    return f"{folder.parent.parent.name}-{folder.name}-{len(list(folder.glob('*.png')))}files"


@needs_data
@pytest.mark.parametrize("lr_folder", _lr_folders(), ids=_lr_folder_id)
def test_imresize_reproduces_benchmark_lr_files_exactly(lr_folder):
    scale = int(lr_folder.name[1:])
    hr_folder = lr_folder.parent.parent / "HR"
    lr_files = sorted(lr_folder.glob("*.png"))
    assert lr_files
    for lr_path in lr_files:
        hr = modcrop(read_image(hr_folder / f"{lr_path.stem.removesuffix(f'x{scale}')}.png"), scale)
        expected = read_image(lr_path)
        generated = imresize(hr, 1 / scale)
        assert generated.dtype == np.uint8
        assert generated.shape == expected.shape, lr_path
        assert np.count_nonzero(generated != expected) == 0, lr_path


# --------------------------------------------------------------------------- imresize values


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3])
def test_imresize_keeps_constant_images_constant(scale):
    uint8_img = np.full((24, 18, 3), 173, dtype=np.uint8)
    assert np.all(imresize(uint8_img, scale) == 173)
    float_img = np.full((24, 18), 0.3)
    np.testing.assert_allclose(imresize(float_img, scale), 0.3, atol=1e-12)


def test_imresize_float_half_of_linear_ramp_is_linear_inside():
    # Symmetric antialiased taps around the output centre 2k + 0.5 (0-based input coordinates)
    # reproduce a linear function exactly where no tap is mirrored: k in [2, 17] for 40 pixels.
    rows, cols = np.mgrid[0:40, 0:40].astype(np.float64)
    out = imresize(3 * rows + cols, 1 / 2)
    assert out.shape == (20, 20) and out.dtype == np.float64
    k = np.arange(2, 18)
    expected = 3 * (2 * k[:, None] + 0.5) + (2 * k[None, :] + 0.5)
    np.testing.assert_allclose(out[2:18, 2:18], expected, atol=1e-10)


def test_imresize_float_half_of_impulse_gives_antialiased_cubic_weights():
    # Output k is centred at 2k + 0.5; weights are 0.5 * cubic(0.5 * distance), with
    # cubic(0.25) = 0.8671875, cubic(0.75) = 0.2265625, cubic(1.25) = -0.0703125,
    # cubic(1.75) = -0.0234375 (Keys a = -0.5), and they already sum to 1.
    img = np.zeros((8, 40), dtype=np.float32)
    img[:, 20] = 1.0
    out = imresize(img, 1 / 2)
    assert out.dtype == np.float32
    expected_row = np.zeros(20)
    expected_row[8:12] = [-0.01171875, 0.11328125, 0.43359375, -0.03515625]
    np.testing.assert_allclose(out, np.tile(expected_row, (4, 1)), atol=1e-6)


def test_imresize_float_upscale_of_linear_ramp_is_linear_inside():
    ramp = np.tile(np.arange(20, dtype=np.float64), (6, 1))
    out = imresize(ramp, 2)
    assert out.shape == (12, 40)
    k = np.arange(5, 35)  # all four taps inside the image
    np.testing.assert_allclose(out[:, 5:35], np.tile(k / 2 - 0.25, (12, 1)), atol=1e-10)


def test_imresize_output_shapes():
    img = np.zeros((7, 5, 3), dtype=np.uint8)
    assert imresize(img, 3).shape == (21, 15, 3)
    assert imresize(np.zeros((10, 8, 3), dtype=np.uint8), 1 / 3).shape == (4, 3, 3)  # ceil
    assert imresize(np.zeros((12, 9)), (1 / 3, 2)).shape == (4, 18)


def test_imresize_resizes_the_smaller_scale_dimension_first():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    columns_then_rows = imresize(imresize(img, (1, 1 / 4)), (1 / 2, 1))  # scale 1 is identity
    np.testing.assert_array_equal(imresize(img, (1 / 2, 1 / 4)), columns_then_rows)


def test_imresize_rejects_bad_inputs():
    with pytest.raises(TypeError):
        imresize(np.zeros((4, 4), dtype=np.int32), 2)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4)), 0)


def test_modcrop():
    img = np.arange(13 * 10 * 3).reshape(13, 10, 3)
    np.testing.assert_array_equal(modcrop(img, 4), img[:12, :8])
    assert modcrop(img[:, :, 0], 3).shape == (12, 9)


# --------------------------------------------------------------------------- image I/O


def test_read_image_gray_l(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), np.stack([gray] * 3, axis=2))


def test_read_image_rgba_drops_alpha(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA"
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])


def test_read_image_palette(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.putdata([2, 0, 1])
    image.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    expected = np.array([[[0, 0, 255], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), expected)


def _write_48_bit_png(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_read_image_16_bit_gray_and_colour_map_alike(tmp_path):
    values = np.array([[0, 128, 255, 257], [300, 32896, 65279, 65535]], dtype=np.uint16)
    expected = np.array([[0, 0, 0, 1], [1, 128, 254, 255]], dtype=np.uint8)  # the high byte, as cv2.imread
    Image.fromarray(values).save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode.startswith("I")  # 16-bit gray PNG
    _write_48_bit_png(tmp_path / "colour.png", np.stack([values, 65535 - values, values], axis=2))
    for name, channels in [("gray", [expected] * 3), ("colour", [expected, 255 - expected, expected])]:
        out = read_image(tmp_path / f"{name}.png")
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, np.stack(channels, axis=2), err_msg=name)


def test_read_image_bad_files_raise_value_error_with_path(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        truncated
    )
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing = tmp_path / "missing.png"
    for path in (corrupt, truncated, missing):
        with pytest.raises(ValueError, match="cannot read image") as error:
            read_image(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_image_refuses_pixels_without_an_8_or_16_bit_range(tmp_path):
    # PIL reads a float TIFF in [0, 1] as black and clips 32-bit integers: both would still get a score.
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "int32.tif")
    for name, reason in [("float.tif", "32-bit float pixels"), ("int32.tif", "32-bit integer pixels beyond")]:
        with pytest.raises(ValueError, match=f"cannot read image {tmp_path / name}: {reason}"):
            read_image(tmp_path / name)
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(tmp_path / "int32_in_range.tif")
    assert Image.open(tmp_path / "int32_in_range.tif").mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "int32_in_range.tif")[..., 0], [[0, 255]])


@pytest.mark.parametrize("side", [7, 9])  # 49 pixels: PIL warns (over the limit); 81: it raises (over twice it)
def test_read_image_refuses_a_decompression_bomb(side, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    write_image(tmp_path / "bomb.png", np.zeros((side, side, 3), np.uint8))
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'bomb.png'}: .*decompression bomb"):
        read_image(tmp_path / "bomb.png")


def test_write_image_round_trips_uint8_and_float(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_image(tmp_path / "nested" / "dir" / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "nested" / "dir" / "rgb.png"), rgb)
    floats = np.array([[[-0.5, 0.0, 0.25], [0.5, 1.0, 3.0]]])
    write_image(tmp_path / "float.png", floats)
    expected = np.array([[[0, 0, 64], [128, 255, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "float.png"), expected)


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.JPG", "c.bmp", "notes.txt", "d.tif"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.bmp", "d.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "absent")
    with pytest.raises(NotADirectoryError, match=f"image folder {tmp_path / 'b.png'} is a file, not a folder"):
        list_images(tmp_path / "b.png")


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    assert resolve_data_root(None) == tmp_path
    flag_dir = tmp_path / "flag"
    flag_dir.mkdir()
    assert resolve_data_root(str(flag_dir)) == flag_dir
    with pytest.raises(FileNotFoundError, match="absent"):
        resolve_data_root(str(tmp_path / "absent"))
    monkeypatch.delenv("JAXQUANT_DATA")
    assert default_data_root() == Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- benchmarks


@needs_data
def test_load_benchmark_b100_generates_lr():
    pairs = load_benchmark(DATA_ROOT, "B100", 2)
    assert len(pairs) == 100
    for pair in pairs:
        assert isinstance(pair, BenchmarkImage)
        assert pair.hr.dtype == pair.lr.dtype == np.uint8
        assert pair.lr.shape == (pair.hr.shape[0] // 2, pair.hr.shape[1] // 2, 3)
    np.testing.assert_array_equal(pairs[0].lr, imresize(pairs[0].hr, 1 / 2))


@needs_data
def test_load_benchmark_reads_existing_lr_and_modcrops_hr():
    pairs = load_benchmark(DATA_ROOT, "Set5", 3)
    assert [p.name for p in pairs] == ["baby", "bird", "butterfly", "head", "woman"]
    baby_hr = read_image(DATA_ROOT / "benchmark/Set5/HR/baby.png")
    np.testing.assert_array_equal(pairs[0].hr, modcrop(baby_hr, 3))
    np.testing.assert_array_equal(
        pairs[0].lr, read_image(DATA_ROOT / "benchmark/Set5/LR_bicubic/X3/babyx3.png")
    )


@needs_data
def test_load_benchmark_missing_dataset_names_path():
    with pytest.raises(FileNotFoundError) as error:
        load_benchmark(DATA_ROOT, "Manga109", 4)
    message = str(error.value)
    assert str(DATA_ROOT / "benchmark" / "Manga109") in message
    assert "Set5" in message


def test_load_benchmark_synthetic_layout(tmp_path):
    hr = np.random.default_rng(2).integers(0, 256, (21, 16, 3), dtype=np.uint8)
    write_image(tmp_path / "benchmark/Toy/HR/img.png", hr)
    (pair,) = load_benchmark(tmp_path, "Toy", 2)
    np.testing.assert_array_equal(pair.hr, hr[:20])
    np.testing.assert_array_equal(pair.lr, imresize(hr[:20], 1 / 2))

    write_image(tmp_path / "benchmark/Toy/LR_bicubic/X2/imgx2.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="expected \\(10, 8, 3\\)"):
        load_benchmark(tmp_path, "Toy", 2)


@pytest.mark.parametrize("height, width, scale", [(1, 1, 2), (3, 3, 2), (15, 40, 2), (40, 31, 4)])
def test_load_benchmark_refuses_images_with_an_lr_side_under_a_window(height, width, scale, tmp_path):
    # An LR side of 1 to 3 breaks the model's flip-pad (and a 0-pixel one imresize): all are refused by name.
    path = tmp_path / "benchmark/Toy/HR/small.png"
    write_image(path, np.zeros((height, width, 3), np.uint8))
    with pytest.raises(ValueError) as error:
        load_benchmark(tmp_path, "Toy", scale)
    assert str(error.value).startswith(f"benchmark image {path} is {width}x{height}, too small for x{scale}")
    assert f"at least {8 * scale}" in str(error.value)


def test_load_benchmark_accepts_an_lr_side_of_one_window(tmp_path):
    write_image(tmp_path / "benchmark/Toy/HR/edge.png", np.zeros((17, 33, 3), np.uint8))
    (pair,) = load_benchmark(tmp_path, "Toy", 2)
    assert pair.lr.shape == (8, 16, 3)


# --------------------------------------------------------------------------- output paths


def test_check_output_path(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    check_output_path(tmp_path / "new" / "deeper" / "out.json")
    check_output_path(tmp_path / "empty", folder=True)
    check_output_path(tmp_path / "new" / "images", folder=True)
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'empty'} is a folder, not a file"):
        check_output_path(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="file is a file, not a folder"):
        check_output_path(tmp_path / "file", folder=True)
    for folder in (False, True):
        with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is a file, not a folder"):
            check_output_path(tmp_path / "file" / "below" / "out", folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # the checks created nothing


def test_check_output_path_refuses_to_overwrite(tmp_path):
    # An existing file, or a folder with anything in it, is kept: a second run must not replace the first's.
    (tmp_path / "results.json").write_text("kept")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'results.json'} exists; choose another path or remove it"):
        check_output_path(tmp_path / "results.json")
    with pytest.raises(FileExistsError, match=f"{tmp_path} exists; choose another path or remove it"):
        check_output_path(tmp_path, folder=True)
    assert (tmp_path / "results.json").read_text() == "kept"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs")
def test_check_output_path_tries_a_write(tmp_path):
    # Root passes os.access in sysfs, where no file can be created: only trying to create one finds out.
    with pytest.raises(PermissionError, match="cannot write /sys/kernel/results.json: no file can be created in /sys"):
        check_output_path("/sys/kernel/results.json")
    check_output_path(tmp_path / "results.json")
    assert not any(tmp_path.iterdir())  # the probe removed its file
