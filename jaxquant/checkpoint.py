"""Models on disk: orbax checkpoints of (config, params[, bounds]) and loading from any model source.

A model checkpoint is an orbax composite directory with items `config` (JSON), `params` (arrays) and, for a
quantized model, `bounds` (the `lu` arrays, nested like the model) plus `bits` (JSON, site path -> bits,
since bits are static and not arrays). `load_model` also accepts an official `.pth` (converted on the fly)
and a run directory of `scripts/quantize.py` (its `model/` checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.quant import Bounds, flat_bounds, nest_bounds
from jaxquant.swinir import SwinIRConfig

Params = Mapping[str, Any]


class Model(NamedTuple):
    config: SwinIRConfig
    params: Params
    bounds: Mapping | None = None  # None: the FP model


def _bounds_to_arrays(bounds: Mapping) -> tuple[dict, dict[str, int]]:
    flat = flat_bounds(bounds)
    lu = nest_bounds({p: np.asarray(b.lu) for p, b in flat.items()})
    return lu, {p: b.bits for p, b in flat.items()}


def _bounds_from_arrays(lu: Mapping, bits: Mapping[str, int]) -> dict:
    flat = {"/".join(k): v for k, v in _flatten(lu)}
    if set(flat) != set(bits):
        raise ValueError("checkpoint bounds and bit widths name different sites")
    return nest_bounds({p: Bounds(jax.numpy.asarray(v), int(bits[p])) for p, v in flat.items()})


def _flatten(tree: Mapping, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def save_model(directory: str | Path, model: Model) -> Path:
    """Write `model` as an orbax checkpoint at `directory` (replaced if it exists)."""
    directory = Path(directory).resolve()
    items = {
        "config": ocp.args.JsonSave(model.config.to_dict()),
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
    with _checkpointer() as ckptr, reading_checkpoint(directory):
        got = ckptr.restore(directory, ocp.args.Composite(**restore))
    config = SwinIRConfig.from_dict(got["config"])
    bounds = _bounds_from_arrays(got["bounds"], got["bits"]) if not missing else None
    return Model(config, got["params"], bounds)


@contextlib.contextmanager
def reading_checkpoint(directory: Path) -> Iterator[None]:
    """Turn a damaged orbax checkpoint (a truncated, missing or garbled file) into one ValueError naming it."""
    _quiet_abandoned_reads()  # before the read: the abandoned reads start finishing while the error unwinds
    try:
        yield
    except (ValueError, OSError) as e:
        cause = str(e).split(" [tensorstore_spec=")[0]  # the rest is tensorstore's whole JSON spec
        raise ValueError(f"{directory} is a damaged checkpoint: {cause}") from None


@functools.cache
def _quiet_abandoned_reads() -> None:
    """When one array of a restore fails, orbax abandons the reads still in flight: as each finishes,
    tensorstore calls back into the closed event loop (a traceback each, hundreds for a model) and asyncio logs
    each abandoned task or future. The restore's own error says what went wrong, so drop those."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())


def load_model(source: str | Path, param_key: str | None = None) -> Model:
    """A model from a `.pth` file, a model checkpoint, or a `scripts/quantize.py` run directory."""
    from weights_convert.swinir import naming_source, torch_to_flax, unwrap_state_dict
    from weights_convert.torch_pickle import load_pth

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
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
