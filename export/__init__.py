"""Export zoo models for serving: ``python -m export.onnx NAME`` (see :mod:`export.onnx`).

What the exported files promise their readers (metadata keys, repository layout, the
preprocessing) is in :mod:`contract`, which a torch-free server imports instead of this package.
"""
