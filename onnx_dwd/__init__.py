"""onnx-dwd: replace regular convolutions of an ONNX model by depthwise + 1x1 convolutions."""

__version__ = "0.1.0"

from .config import OptimizeConfig  # noqa: E402
from .errors import DwdError  # noqa: E402
from .api import optimize  # noqa: E402

__all__ = ["optimize", "OptimizeConfig", "DwdError", "__version__"]
