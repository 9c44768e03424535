"""jaxquant: 2DQuant (Liu et al., NeurIPS 2024) post-training quantization of SwinIR-light (and NGswin) in JAX/Flax.

    import jaxquant
    model = jaxquant.load_model("swinir_light_x4.pth")                    # or a checkpoint / run directory
    bounds = jaxquant.init_bounds(model.config, jaxquant.QuantRules.uniform(4))
    bounds = jaxquant.calibrate(model.config, jaxquant.Calibration(), model.params, bounds, lr_patches)  # DOBI
    pool = jaxquant.lr_pool_from_folder("train/t291", scale=4, min_size=32, keep_hr=False)
    bounds = jaxquant.distill(model, bounds, jaxquant.DQCConfig(steps=100, batch=4, patch=32), pool).best  # DQC
    sr = jaxquant.quantize(model.params, bounds)(lr_images)               # fake-quant W4A4 forward
"""

from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.cpu_memory import keep_cpu_scratch
from jaxquant.data import load_benchmark, load_benchmarks
from jaxquant.dobi import Calibration, calibrate, dobi_search
from jaxquant.dqc import DQCConfig, DQCState, dqc_step, init_state
from jaxquant.evaluation import evaluate
from jaxquant.metrics import psnr_y, ssim_y, to_uint8
from jaxquant.patches import PatchPool, lr_pool_from_folder, sample_patches
from jaxquant.pipeline import Distillation, distill, read_bounds_json, write_bounds_json
from jaxquant.quant import (
    Bounds, QuantizedSwinIR, QuantRules, bounds_from_official, bounds_to_official, fake_quant, init_bounds,
    integer_view, list_sites, quantize,
)
from jaxquant.models import config_from_params
from jaxquant.ngswin import NGswin, NGswinConfig, ngswin
from jaxquant.swinir import SwinIR, SwinIRConfig, swinir_light

__all__ = [
    "Bounds", "Calibration", "DQCConfig", "DQCState", "Distillation", "Model", "NGswin", "NGswinConfig", "PatchPool",
    "QuantRules", "QuantizedSwinIR", "SwinIR", "SwinIRConfig", "bounds_from_official", "bounds_to_official",
    "calibrate", "config_from_params", "distill", "dobi_search", "dqc_step", "evaluate", "fake_quant", "init_bounds",
    "init_state", "integer_view", "keep_cpu_scratch", "list_sites", "load_benchmark", "load_benchmarks",
    "load_model", "lr_pool_from_folder", "ngswin", "psnr_y", "quantize", "read_bounds_json", "sample_patches",
    "save_model", "ssim_y", "swinir_light", "to_uint8", "write_bounds_json",
]
