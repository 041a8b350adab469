"""quaff-fx: Quaff (arXiv 2505.14742) outlier-scaled int8 quantization for fine-tuning, as graph passes."""
from .baselines import LLMInt8Config, NaiveW8A8Config, SmoothQuantConfig
from .calibration import CalibrationStats, calibrate
from .capture import capture, find_linears
from .config import OutlierConfig, QuaffConfig
from .errors import QuaffError
from .io import load_stats, save_quantized, save_stats
from .pipeline import QuaffPass, QuaffPassResult, run_passes
from .quaff_linear import QuaffLinear, int8_backward_
from .quantize import CalibrationConfig, QuantizeResult, quantize_, register_quantize_handler
from .report import PassReport
from .transform import TransformResult, calibrate_text, default_passes, load_quantized, transform

__all__ = [
    "CalibrationStats", "OutlierConfig", "PassReport", "QuaffConfig", "QuaffError", "QuaffLinear", "QuaffPass",
    "QuaffPassResult", "TransformResult", "calibrate", "calibrate_text", "capture", "default_passes", "find_linears",
    "load_quantized", "int8_backward_", "load_stats", "run_passes", "save_quantized", "save_stats", "transform",
    "CalibrationConfig", "QuantizeResult", "quantize_", "register_quantize_handler", "NaiveW8A8Config",
    "SmoothQuantConfig", "LLMInt8Config",
]
__version__ = "0.1.0"
from .backend import make_backend  # noqa: E402  (registers the torch.compile backend "quaff")

__all__ += ["make_backend"]
