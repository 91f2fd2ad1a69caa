"""Runtimes that run models: onnxruntime for now (latency runners come later)."""

from .ort import make_session, run_batches

__all__ = ["make_session", "run_batches"]
