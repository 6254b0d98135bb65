"""hirelc: hierarchical RL search for joint structured pruning and mixed-precision quantization,
lowered to physically smaller integer models and exported as ONNX with QDQ nodes."""

from hirelc.errors import HirelcError

__version__ = "0.1.0"
__all__ = ["HirelcError", "__version__"]
