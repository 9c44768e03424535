"""State dicts of either architecture <-> Flax params: the architecture is recognised from the keys (NGswin's by
`shallow_extract.conv1.weight`, anything else is read as SwinIR), so no script needs a model flag."""

from __future__ import annotations

import numpy as np

from jaxquant.models import ModelConfig
from jaxquant.ngswin import NGswinConfig
from weights_convert import ngswin, swinir


def torch_to_flax(sd: dict[str, np.ndarray]) -> tuple[ModelConfig, dict]:
    converter = ngswin if ngswin.is_ngswin_state_dict(sd) else swinir
    return converter.torch_to_flax(sd)


def flax_to_torch(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The state dict in its authors' layout: SwinIR's official one or NGswin's."""
    converter = ngswin if isinstance(config, NGswinConfig) else swinir
    return converter.flax_to_torch(config, params)
