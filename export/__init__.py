"""Export zoo models for serving: ``python -m export.onnx NAME`` (see :mod:`export.onnx`).

Importing this package imports neither torch nor onnx, so a torch-free server can use
:mod:`export.metadata`, the metadata contract between the exported file and its readers.
"""
