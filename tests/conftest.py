"""Shared fixtures: strict numerics (as equinox/penzai test), the data root, golden arrays, converted models."""

import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.checkpoint import load_model
from jaxquant.data import default_data_root, load_benchmark
from jaxquant.dobi import Calibration, calibrate
from jaxquant.quant import Bounds, QuantRules, flat_bounds, init_bounds, nest_bounds

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Parity with the golden float32 arrays: a GPU's default matmuls are TF32 (~3e-4 relative, spec section 8).
# On a CPU this changes nothing (a DQC step and a forward are bitwise equal with and without it).
jax.config.update("jax_default_matmul_precision", "highest")

# One compilation cache for the session's processes: the pytest workers and the scripts they run compile the same
# programs (a Set5 forward, a DQC step) many times over; entries are keyed by the program, so a hit is the same
# compiled code. Unless the environment already names a cache, a fresh one is made by the first process (the xdist
# controller, or the only one), inherited through the environment by the rest, and removed by its maker.
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
if CACHE_ENV not in os.environ:
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="jaxquant-test-compilations-")
    os.environ["JAXQUANT_TEST_CACHE_OWNER"] = str(os.getpid())
jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])


def pytest_unconfigure(config):
    if os.environ.get("JAXQUANT_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)

DATA_ROOT = default_data_root()
GOLDEN_DIR = DATA_ROOT.parent / "golden"


def ctrl_c_on_call(monkeypatch, module, name: str, call: int) -> None:
    """Patch `module.name` so that its `call`-th call first sends this process a real SIGINT, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a signal handler can only be installed on the main thread")
    original, calls = getattr(module, name), itertools.count(1)

    def interrupting(*args, **kwargs):
        if next(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for a test that relies on it, restored after: a test
    before it in the same pytest-xdist worker once left another (seen only in a fresh virtual environment)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a signal handler can only be installed on the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"missing {path}")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return require(DATA_ROOT)


@pytest.fixture(scope="session", params=[2, 4], ids=["x2", "x4"])
def scale(request) -> int:
    return request.param


@pytest.fixture(scope="session")
def t291_model():
    """Converted t291 SwinIR-light models by scale (converted once per session)."""
    cache = {}

    def get(scale: int):
        if scale not in cache:
            cache[scale] = load_model(require(DATA_ROOT / "weights" / f"swinir_light_x{scale}_t291.pth"))
        return cache[scale]

    return get


@pytest.fixture(scope="session")
def x2_crop(data_root) -> jax.Array:
    """A 24x32 LR crop of Set5's third image at x2, (1, H, W, 3) in [0, 1]: a whole forward in seconds."""
    return jnp.asarray(load_benchmark(data_root, "Set5", 2)[2].lr[:24, :32], jnp.float32)[None] / 255.0


@pytest.fixture(scope="session")
def x2_minmax(t291_model, x2_crop):
    """`x2_minmax(bits)`: the x2 t291 model with MinMax bounds of `x2_crop` at `bits` everywhere. One calibration
    serves every width: MinMax bounds do not depend on the bits."""
    model = t291_model(2)
    calibrated = flat_bounds(calibrate(model.config, Calibration(method="minmax"), model.params,
                                       init_bounds(model.config, QuantRules.uniform(8)), x2_crop))
    return lambda bits: model._replace(bounds=nest_bounds({p: Bounds(b.lu, bits) for p, b in calibrated.items()}))


@pytest.fixture(scope="session")
def golden():
    """Golden arrays (NCHW as produced by PyTorch) and quantizer names of the official code, by scale."""

    def get(scale: int):
        arrays = np.load(require(GOLDEN_DIR / f"official_x{scale}.npz"))
        meta = json.loads((GOLDEN_DIR / f"official_x{scale}.json").read_text())
        return arrays, meta

    return get


def nhwc(a: np.ndarray) -> jax.Array:
    return jax.numpy.asarray(a.transpose(0, 2, 3, 1))


def nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)
