"""Export zoo models for serving: ``python -m export.onnx NAME`` on the command line, or
:func:`export` with an :class:`ExportConfig` from Python.

- :mod:`export.config`: ExportConfig, ExportResult, defaults and tolerances, errors, reporters
- :mod:`export.plan`: arguments and weight sources resolved, output directory and version claimed
- :mod:`export.convert`: PyTorch -> ONNX, graph checks, fp16, int8
- :mod:`export.verify`: onnxruntime parity against eager PyTorch, the gates, latency
- :mod:`export.pipeline`: :func:`export`, the steps in order
- :mod:`export.onnx`: the command line

What the exported files promise their readers (metadata keys, repository layout, the
preprocessing) is in :mod:`contract`, which a torch-free server imports instead of this package.
"""
from export.config import ExportConfig, ExportResult, UserError, VerificationError
from export.pipeline import export

__all__ = ["ExportConfig", "ExportResult", "UserError", "VerificationError", "export"]
