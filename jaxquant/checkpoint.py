"""Models on disk: orbax checkpoints of (config, params[, bounds]) and loading from any model source.

A model checkpoint is an orbax composite directory with items `config` (JSON), `params` (arrays) and, for a
quantized model, `bounds` (the `lu` arrays, nested like the model) plus `bits` (JSON, site path -> bits,
since bits are static and not arrays). `load_model` also accepts an official `.pth` (converted on the fly),
a low-bit `.safetensors` file (`jaxquant.lowbit`) and a run directory of `scripts/quantize.py` (its `model/`
checkpoint). A checkpoint is checked as a `.pth` is
(config fields, every param's shape, bit widths), so a damaged one is one ValueError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant import models
from jaxquant.models import ModelConfig
from jaxquant.quant import Bounds, check_bits, check_finite_pair, flat_bounds, nest_bounds

Params = Mapping[str, Any]
SAFETENSORS = ".safetensors"  # a low-bit model file (`jaxquant.lowbit`)


class Model(NamedTuple):
    config: ModelConfig  # SwinIRConfig or NGswinConfig
    params: Params
    bounds: Mapping | None = None  # None: the FP model


def _bounds_to_arrays(bounds: Mapping) -> tuple[dict, dict[str, int]]:
    flat = flat_bounds(bounds)
    lu = nest_bounds({p: np.asarray(b.lu) for p, b in flat.items()})
    return lu, {p: b.bits for p, b in flat.items()}


def _bounds_from_arrays(lu: Mapping, bits: Any) -> dict:
    """The bounds pytree of a checkpoint's `bounds` and `bits` items, every site's bit width checked."""
    flat = {"/".join(k): v for k, v in _flatten(lu)}
    if not isinstance(bits, dict):
        raise ValueError(f"bits is a JSON {type(bits).__name__}, not an object of site -> bit width")
    if set(flat) != set(bits):
        only_bounds, only_bits = sorted(set(flat) - set(bits)), sorted(set(bits) - set(flat))
        raise ValueError(
            f"bounds and bit widths name different sites: {len(only_bounds)} only in bounds {only_bounds[:2]}, "
            f"{len(only_bits)} only in bits {only_bits[:2]}"
        )
    for path, width in bits.items():
        check_bits(width, where=path)
    for path, lu in flat.items():
        # NaN or infinite bounds would turn every output NaN without a word. Crossed ones load as saved (DQC
        # could, in principle, write them; the traced quantizer keeps its step positive).
        pair = check_finite_pair(lu, where=path)
        if pair.dtype.kind != "f":
            raise ValueError(f"{path}: bounds of integer type {pair.dtype}")
    return nest_bounds({p: Bounds(jax.numpy.asarray(v), bits[p]) for p, v in flat.items()})


def _flatten(tree: Mapping, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def save_model(directory: str | Path, model: Model, *, overwrite: bool = False) -> Path:
    """Write `model` as an orbax checkpoint at `directory`, which must not exist unless `overwrite`."""
    directory = Path(directory).resolve()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; save elsewhere or pass overwrite=True to replace it")
    items = {
        "config": ocp.args.JsonSave(models.config_to_json(model.config)),
        "params": ocp.args.StandardSave(jax.tree.map(np.asarray, model.params)),
    }
    if model.bounds is not None:
        lu, bits = _bounds_to_arrays(model.bounds)
        items["bounds"] = ocp.args.StandardSave(lu)
        items["bits"] = ocp.args.JsonSave(bits)
    with _checkpointer() as ckptr:
        ckptr.save(directory, ocp.args.Composite(**items), force=True)
    return directory


def _checkpointer() -> ocp.Checkpointer:
    """A checkpointer that knows each item's handler (orbax warns about every item it cannot place)."""
    json_item, array_item = ocp.JsonCheckpointHandler, ocp.StandardCheckpointHandler
    items = {"config": json_item(), "params": array_item(), "bounds": array_item(), "bits": json_item()}
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**items))


def _restore_checkpoint(directory: Path) -> Model:
    names = {item.name for item in directory.iterdir() if item.is_dir()}  # a composite checkpoint's items
    if not {"config", "params"} <= names:
        raise ValueError(f"{directory} is an orbax checkpoint but not a jaxquant model (items: {sorted(names)})")
    missing = {"bounds", "bits"} - names
    if len(missing) == 1:  # the other alone would load a quantized model as the FP one
        raise ValueError(f"{directory} is a damaged quantized model: its {missing.pop()} item is missing")
    restore = {"config": ocp.args.JsonRestore(), "params": ocp.args.StandardRestore()}
    if not missing:
        restore |= {"bounds": ocp.args.StandardRestore(), "bits": ocp.args.JsonRestore()}
    with reading_checkpoint(directory):  # also for what the items hold, checked before anything uses them
        with _checkpointer() as ckptr:
            got = ckptr.restore(directory, ocp.args.Composite(**restore))
        config = models.config_from_json(got["config"])
        models.check_params(config, got["params"])
        bounds = _bounds_from_arrays(got["bounds"], got["bits"]) if not missing else None
    return Model(config, got["params"], bounds)


@contextlib.contextmanager
def reading_checkpoint(directory: Path) -> Iterator[None]:
    """Turn a damaged orbax checkpoint (a truncated, missing or garbled file, a missing item) into one ValueError
    naming it.

    When one array of a restore fails, orbax abandons the reads still in flight: as each finishes, tensorstore
    calls back into the closed event loop (a traceback each, hundreds for a model) and asyncio logs each
    abandoned task. The error raised says what went wrong, so those reports are dropped: during the read, and
    after a failed one (they arrive while and after its error unwinds). A read that succeeds leaves the
    process's hooks as they were."""
    previous_hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
    filtered_before = _not_an_abandoned_task in asyncio_log.filters  # by an earlier failed read
    if not filtered_before:
        sys.unraisablehook = functools.partial(_unless_abandoned_read, previous_hook)
        asyncio_log.addFilter(_not_an_abandoned_task)
    try:
        yield
    except (ValueError, OSError, KeyError) as e:  # KeyError: orbax's 'Item "default" was not found ...'
        raise ValueError(f"{directory} is a damaged checkpoint: {_cause(e)}") from None
    if not filtered_before:
        sys.unraisablehook = previous_hook
        asyncio_log.removeFilter(_not_an_abandoned_task)


def _unless_abandoned_read(report: Callable[[Any], None], unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        report(unraisable)


def _not_an_abandoned_task(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _cause(error: Exception) -> str:
    """An error's message alone: a KeyError's str() is the repr of its key, and tensorstore appends its whole JSON
    spec."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return message.split(" [tensorstore_spec=")[0]


def load_model(source: str | Path, param_key: str | None = None) -> Model:
    """A model from a `.pth` file, a low-bit `.safetensors` file (`jaxquant.lowbit`; its quantized weights
    dequantized, as the fake quantizer gives them), a model checkpoint, or a `scripts/quantize.py` run directory."""
    from weights_convert.models import torch_to_flax
    from weights_convert.swinir import naming_source, unwrap_state_dict
    from weights_convert.torch_pickle import load_pth

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file() and path.suffix == SAFETENSORS:
        from jaxquant.lowbit import load_lowbit  # which imports this module

        return load_lowbit(path).dequantized()
    if path.is_file():
        with naming_source(path):
            config, params = torch_to_flax(unwrap_state_dict(load_pth(path), param_key))
        return Model(config, params)
    if (path / "model").is_dir():  # a run directory
        path = path / "model"
    elif any((path / name).is_file() for name in ("run_config.json", "train_config.json")):
        raise FileNotFoundError(f"{path} is a run directory without a model yet (unfinished?); resume it first")
    if not (path / "config").exists():
        raise ValueError(f"{path} is neither a .pth file, a model checkpoint nor a run directory")
    return _restore_checkpoint(path.resolve())
