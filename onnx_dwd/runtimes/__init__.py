"""Runtimes that run and time models.

ort.py: onnxruntime sessions (what optimize itself runs on). base.py: the
Runner interface every latency runtime implements (onnxruntime, and the
optional LiteRT, ncnn, MNN and OpenVINO runners in their own modules, imported
only when asked for by name). layer_latency.py: single-layer timing through a
Runner.
"""

from .base import RUNTIMES, Loaded, Runner, get_runner
from .ort import make_session, run_batches

__all__ = ["RUNTIMES", "Loaded", "Runner", "get_runner", "make_session", "run_batches"]
