"""jaxquant: 2DQuant (Liu et al., NeurIPS 2024) post-training quantization of SwinIR-light (and NGswin) in JAX/Flax.

    import jaxquant
    model = jaxquant.load_model("swinir_light_x4.pth")                    # or a checkpoint / run directory
    bounds = jaxquant.init_bounds(model.config, jaxquant.QuantRules.uniform(4))
    bounds = jaxquant.calibrate(model.config, jaxquant.Calibration(), model.params, bounds, lr_patches)  # DOBI
    sr = jaxquant.quantize(model.params, bounds)(lr_images)               # fake-quant W4A4 forward
"""

from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.cpu_memory import keep_cpu_scratch
from jaxquant.data import load_benchmarks
from jaxquant.dobi import Calibration, calibrate, dobi_search
from jaxquant.dqc import DQCConfig, dqc_step, init_state
from jaxquant.evaluate import evaluate
from jaxquant.quant import (
    Bounds, QuantizedSwinIR, QuantRules, bounds_from_official, bounds_to_official, fake_quant, init_bounds,
    integer_view, list_sites, quantize,
)
from jaxquant.models import config_from_params
from jaxquant.ngswin import NGswin, NGswinConfig, ngswin
from jaxquant.swinir import SwinIR, SwinIRConfig, swinir_light

__all__ = [
    "Bounds", "Calibration", "DQCConfig", "Model", "NGswin", "NGswinConfig", "QuantRules", "QuantizedSwinIR", "SwinIR", "SwinIRConfig",
    "bounds_from_official", "bounds_to_official", "calibrate", "config_from_params", "dobi_search", "dqc_step",
    "evaluate", "fake_quant", "init_bounds", "init_state", "integer_view", "keep_cpu_scratch", "list_sites",
    "load_benchmarks", "load_model", "ngswin", "quantize", "save_model", "swinir_light",
]
