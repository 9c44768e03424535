"""Image I/O, MATLAB-bicubic resizing and benchmark loading (numpy + pillow only).

`imresize` ports MATLAB `imresize(img, scale, 'bicubic')` as re-implemented in BasicSR
`basicsr/utils/matlab_functions.py` (`cubic`, `calculate_weights_indices`, `imresize`), with two
MATLAB behaviours BasicSR leaves out: uint8 images are rounded (half up) and clipped after each
1-D pass, and boundary indices are mirrored by MATLAB's modulo rule. Together these reproduce the
benchmark `LR_bicubic` files pixel for pixel (see shared/data/SOURCES.md).
`load_benchmark` follows the BasicSR `benchmark/<name>/{HR,LR_bicubic/X<s>}` layout and
`filename_tmpl: '{}x<s>'` used by 2DQuant's test options.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from jaxquant.metrics import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DATA_ROOT_ENV = "JAXQUANT_DATA"
# SwinIR flip-pads each LR side up to a multiple of its window by appending the side's mirror, which needs
# the side to be at least the pad: 4 for SwinIR-light's window of 8. One such window is a plain rule that
# holds for every window up to 16.
MIN_LR_SIDE = 8

# --------------------------------------------------------------------------- data root


def default_data_root() -> Path:
    """`$JAXQUANT_DATA` if set, else `<repo root>/../shared/data`."""
    from_env = os.environ.get(DATA_ROOT_ENV)
    if from_env:
        return Path(from_env)
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"


def resolve_data_root(flag_value: str | None) -> Path:
    """The data root from a command-line flag, else `default_data_root()`; must exist."""
    root = Path(flag_value) if flag_value else default_data_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist (pass a data-root flag or set ${DATA_ROOT_ENV})"
        )
    return root


# --------------------------------------------------------------------------- image I/O


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    # The high byte: what PIL does to 16-bit colour PNGs, and what cv2.imread (the official code's reader) does
    # to any 16-bit image, gray or colour.
    return (values >> 8).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any common image as a uint8 HxWx3 RGB array (alpha dropped, gray replicated).

    Float pixels, 32-bit integers beyond the 16-bit range and images over PIL's decompression-bomb limit
    (`Image.MAX_IMAGE_PIXELS`) are refused: floats have no agreed range (PIL would read a [0, 1] float TIFF
    as black and the model would still score it), and a bomb would take the memory of the whole run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice the limit
            with Image.open(path) as image:
                image.load()
                if image.mode == "F":
                    raise ValueError("32-bit float pixels have no agreed range; save it with 8 or 16 bits")
                if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit gray as PIL reports it
                    values = np.asarray(image, dtype=np.int64)
                    if values.min() < 0 or values.max() > 65535:
                        raise ValueError("32-bit integer pixels beyond the 16-bit range; save it with 8 or 16 bits")
                    return np.repeat(_sixteen_bit_to_uint8(values)[:, :, None], 3, axis=2)
                return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    # PIL raises all of OSError, ValueError and SyntaxError on bad files; its bomb error is none of them
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"cannot read image {path}: {reason}") from None


def write_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an HxW(x1|x3) image given as uint8 or as float in [0, 1] (rounded, clipped)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"write_image expects uint8 or float, got {array.dtype}")
        array = to_uint8(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"write_image expects HxW or HxWx3, got shape {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def check_output_path(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse, before any work is done, an output path that would lose data or cannot be written: an existing
    file, or a non-empty folder where a folder is wanted (nothing is overwritten), an existing file where a
    folder is wanted or the reverse, a path under a file, or one where no file can be created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise FileExistsError(f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    if path.is_file() or (path.is_dir() and any(path.iterdir())):  # an empty folder holds nothing to lose
        raise FileExistsError(f"{path} exists; choose another path or remove it")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder")
    if existing.is_dir():  # not a device such as /dev/null, which is written as it is
        _probe_write(existing, path)


def _probe_write(folder: Path, path: Path) -> None:
    """Create and remove a file in `folder`, for `path` below it (`os.access` is no test: root passes it for
    folders such as /sys, where nothing can be created)."""
    try:
        tempfile.NamedTemporaryFile(dir=folder).close()
    except OSError as error:
        raise PermissionError(f"cannot write {path}: no file can be created in {folder} ({error.strerror})") from None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (png/jpg/jpeg/bmp/tif) directly in `folder`, sorted by name."""
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"image folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


# --------------------------------------------------------------------------- MATLAB imresize


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB's 'bicubic')."""
    absx = np.abs(x)
    absx2, absx3 = absx**2, absx**3
    near = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return near + far


def _mirror_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Map out-of-range 0-based indices into [0, length) by symmetric reflection (edge repeated)."""
    folded = np.mod(indices, 2 * length)
    return np.where(folded < length, folded, 2 * length - 1 - folded)


def _output_length(in_length: int, scale: float) -> int:
    # MATLAB: ceil(scale * size); the tolerance keeps e.g. 255 * (1/3) from becoming 86.
    return max(1, math.ceil(in_length * scale - 1e-9))


def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """Dense (out_length, in_length) float64 matrix of one bicubic 1-D resize pass.

    Port of BasicSR `calculate_weights_indices` (antialiasing on); taps falling outside the
    signal are folded back with MATLAB's symmetric rule and accumulated.
    """
    antialias = scale < 1
    kernel_width = 4.0 / scale if antialias else 4.0  # antialiasing widens the kernel by 1/scale
    out_positions = np.arange(1, out_length + 1, dtype=np.float64)
    centers = out_positions / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    left = np.floor(centers - kernel_width / 2)
    num_taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(num_taps)[None, :]
    distance = centers[:, None] - indices
    weights = scale * _cubic(distance * scale) if antialias else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)

    columns = _mirror_indices(indices.astype(np.int64) - 1, in_length)
    rows = np.broadcast_to(np.arange(out_length)[:, None], columns.shape)
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (rows.ravel(), columns.ravel()), weights.ravel())
    return matrix


def _round_half_up_uint8(values: np.ndarray) -> np.ndarray:
    # MATLAB's uint8 cast rounds half away from zero; np.round (half to even) is off by one at ties.
    return np.clip(np.floor(values + 0.5), 0, 255)


def imresize(img: np.ndarray, scale: float | tuple[float, float]) -> np.ndarray:
    """MATLAB `imresize(img, scale, 'bicubic')` (antialiased) of an HxW or HxWxC image.

    `scale` is one factor or (scale_h, scale_w). uint8 in -> uint8 out, rounded after each pass
    exactly like MATLAB; float in -> same float dtype, no rounding. The dimension with the smaller
    scale is resized first (rows first on a tie), as MATLAB does.
    """
    img = np.asarray(img)
    is_uint8 = img.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(img.dtype, np.floating)):
        raise TypeError(f"imresize expects uint8 or float images, got {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects HxW or HxWxC, got shape {img.shape}")
    scales = (scale, scale) if np.isscalar(scale) else tuple(scale)
    if len(scales) != 2 or min(scales) <= 0:
        raise ValueError(f"imresize scale must be positive (one or two values), got {scale}")

    result = img.astype(np.float64)
    for axis in sorted((0, 1), key=lambda a: scales[a]):  # stable sort: rows first on a tie
        in_length = result.shape[axis]
        matrix = resize_matrix(in_length, _output_length(in_length, scales[axis]), scales[axis])
        result = np.moveaxis(np.tensordot(matrix, result, axes=(1, axis)), 0, axis)
        if is_uint8:
            result = _round_half_up_uint8(result)
    return result.astype(img.dtype)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of `scale`."""
    height, width = img.shape[:2]
    return img[: height - height % scale, : width - width % scale]


# --------------------------------------------------------------------------- benchmarks


class BenchmarkImage(NamedTuple):
    name: str
    hr: np.ndarray  # uint8 HxWx3, modcropped to a multiple of the scale
    lr: np.ndarray  # uint8 (H/s)x(W/s)x3


PAPER_BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")  # the order of SR papers' tables


def available_benchmarks(data_root: Path) -> list[str]:
    """The benchmarks under `<root>/benchmark` (each a folder with `HR/`): the paper's in its order, then the rest."""
    benchmark_root = data_root / "benchmark"
    found = {p.name for p in benchmark_root.iterdir() if (p / "HR").is_dir()} if benchmark_root.is_dir() else set()
    return [name for name in PAPER_BENCHMARKS if name in found] + sorted(found - set(PAPER_BENCHMARKS))


def benchmark_names(spec: str, data_root: Path) -> list[str]:
    """Benchmark names from a command line's comma-separated list; `all` is every benchmark the data root has."""
    names = available_benchmarks(data_root) if spec == "all" else [name for name in spec.split(",") if name]
    if not names:
        raise ValueError(f"--datasets {spec!r} names no benchmark" + (f" ({data_root / 'benchmark'} has none)"
                                                                     if spec == "all" else ""))
    return names


def benchmark_dir(data_root: Path, name: str) -> Path:
    """`<root>/benchmark/<name>`; a missing dataset is a FileNotFoundError naming the path."""
    dataset_dir = data_root / "benchmark" / name
    if not (dataset_dir / "HR").is_dir():
        available = available_benchmarks(data_root)
        raise FileNotFoundError(
            f"benchmark {name!r} not found: expected {dataset_dir / 'HR'}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return dataset_dir


def load_benchmark(data_root: str | os.PathLike, name: str, scale: int) -> list[BenchmarkImage]:
    """HR/LR pairs of benchmark `name` at integer `scale` (LR made by `imresize` when absent).

    An HR image whose LR would have a side under `MIN_LR_SIDE` is refused, naming the file."""
    dataset_dir = benchmark_dir(Path(data_root), name)
    lr_dir = dataset_dir / "LR_bicubic" / f"X{scale}"
    pairs = []
    for hr_path in list_images(dataset_dir / "HR"):
        hr = read_image(hr_path)
        if min(hr.shape[:2]) // scale < MIN_LR_SIDE:
            raise ValueError(
                f"benchmark image {hr_path} is {hr.shape[1]}x{hr.shape[0]}, too small for x{scale}: "
                f"each side must be at least {MIN_LR_SIDE * scale} (an LR side of {MIN_LR_SIDE}, the model window)"
            )
        hr = modcrop(hr, scale)
        lr_path = lr_dir / f"{hr_path.stem}x{scale}.png"
        lr = read_image(lr_path) if lr_path.is_file() else imresize(hr, 1 / scale)
        expected_shape = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
        if lr.shape != expected_shape:
            raise ValueError(
                f"LR {lr_path} has shape {lr.shape}, expected {expected_shape} "
                f"(modcropped HR {hr.shape} / {scale})"
            )
        pairs.append(BenchmarkImage(hr_path.stem, hr, lr))
    return pairs


def load_benchmarks(data_root: str | os.PathLike, names: Sequence[str], scale: int) -> dict[str, list[BenchmarkImage]]:
    """`{name: load_benchmark(...)}` in order: every image is read (and checked) before any is evaluated."""
    return {name: load_benchmark(data_root, name, scale) for name in names}
