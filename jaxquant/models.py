"""The model interface the pipeline runs on: what quantization, DOBI, DQC, evaluation and checkpoints need to know
about an architecture, one `Architecture` record per config type.

Both models are Flax modules built from their config with an injected quantization `site` (and `dtype`, `remat`,
`scan`), returning `(output, stage_features)`: the features are DQC's taps. The rest differs per model:
- SwinIR (`jaxquant.swinir`): flip-pads to a multiple of its window inside its forward, so its test protocol adds
  nothing; taps at the four stage outputs.
- NGswin (`jaxquant.ngswin`): the authors test with the LR image padded symmetric to a multiple of 32 before the
  model (the forward's own zero padding then adds nothing); taps at the three encoder stage outputs and the
  decoder stage output.
Checkpoints store the architecture's `name` beside the config fields (`config_to_json`); a config without one
is SwinIR's, as every checkpoint written before NGswin.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from jaxquant import ngswin, swinir
from jaxquant.ngswin import NGswin, NGswinConfig
from jaxquant.swinir import SwinIR, SwinIRConfig

Array = jax.Array
ModelConfig = SwinIRConfig | NGswinConfig


def _no_padding(config: SwinIRConfig, x: Array) -> Array:
    del config
    return x


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # stored in checkpoints
    config_type: type
    module: Callable[..., nn.Module]  # (config, site=, dtype=, remat=, scan=) -> Flax module
    test_pad: Callable[[ModelConfig, Array], Array]  # the test protocol's padding of (B, H, W, C) LR before the model
    probe_size: Callable[[ModelConfig], int]  # a small input side every part of the model accepts
    describe: Callable[[ModelConfig], str]
    check_params: Callable[[ModelConfig, Mapping], None]
    config_from_params: Callable[[Mapping], ModelConfig]


ARCHITECTURES = (
    Architecture("swinir", SwinIRConfig, SwinIR, _no_padding, lambda c: 2 * c.window_size, swinir.describe,
                 swinir.check_params, swinir.config_from_params),
    Architecture("ngswin", NGswinConfig, NGswin, lambda c, x: ngswin.symmetric_pad(x, c.pad_unit),
                 lambda c: c.pad_unit, ngswin.describe, ngswin.check_params, ngswin.config_from_params),
)


def architecture(config_or_name: ModelConfig | str) -> Architecture:
    for arch in ARCHITECTURES:
        if config_or_name == arch.name or isinstance(config_or_name, arch.config_type):
            return arch
    raise ValueError(f"unknown model {config_or_name!r}; known: {', '.join(a.name for a in ARCHITECTURES)}")


def build(config: ModelConfig, **kwargs) -> nn.Module:
    """The Flax module of `config`'s architecture; `kwargs` among site, dtype, remat, scan."""
    return architecture(config).module(config, **kwargs)


def describe(config: ModelConfig) -> str:
    return architecture(config).describe(config)


def check_params(config: ModelConfig, params: Mapping) -> None:
    architecture(config).check_params(config, params)


def config_from_params(params: Mapping) -> ModelConfig:
    """The architecture and config `params` were made with, read off their names and shapes."""
    is_ngswin = isinstance(params, Mapping) and "shallow_extract" in params
    return (ngswin.config_from_params if is_ngswin else swinir.config_from_params)(params)


def config_to_json(config: ModelConfig) -> dict:
    return {"model": architecture(config).name, **config.to_dict()}


def config_from_json(saved: typing.Any) -> ModelConfig:
    """The config of a checkpoint's `config` item, every field there and of its type: a hand-edited one would
    otherwise fail in the constructor with a TypeError naming no file. Without "model", SwinIR's."""
    if not isinstance(saved, dict):
        raise ValueError(f"config is a JSON {type(saved).__name__}, not an object")
    saved = dict(saved)
    arch = architecture(saved.pop("model", "swinir"))
    kind = arch.config_type
    fields = typing.get_type_hints(kind)
    unknown, missing = sorted(set(saved) - set(fields)), sorted(set(fields) - set(saved))
    if unknown or missing:
        raise ValueError(f"config keys do not match {kind.__name__} (unknown: {unknown}, missing: {missing})")
    for name, hint in fields.items():
        if not _is_json_value_of(saved[name], hint):
            raise ValueError(f"config {name} is {saved[name]!r}; {kind.__name__} needs {_describe_kind(hint)}")
    try:
        return kind.from_dict(saved)  # which checks how the fields go together
    except ValueError as e:
        raise ValueError(f"config: {e}") from None


def _is_json_value_of(value: typing.Any, kind: typing.Any) -> bool:
    """Whether JSON `value` can stand for a config field of type `kind` (every number in it is positive)."""
    if typing.get_origin(kind) is tuple:
        return isinstance(value, list) and len(value) > 0 and all(_is_json_value_of(v, int) for v in value)
    if kind is str:
        return isinstance(value, str)
    numbers = (int, float) if kind is float else (int,)
    return isinstance(value, numbers) and not isinstance(value, bool) and 0 < value < math.inf  # not NaN either


def _describe_kind(kind: typing.Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "a non-empty list of positive integers"
    return {int: "a positive integer", float: "a positive number", str: "a string"}[kind]
