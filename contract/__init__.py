"""What training, export and serving agree on, written once; torch-free.

- :mod:`contract.metadata`: the ``zoo.*`` keys an exported ONNX model carries.
- :mod:`contract.preprocess`: the preprocessing config and the evaluation transform (numpy +
  Pillow), applied to the val set in training and to client images in serving.
- :mod:`contract.names`: how models and versions are named (``NAME``, ``NAME:VERSION``).
- :mod:`contract.repository`: the model repository layout (names, version directories,
  ``labels.txt``) and Triton's ``config.pbtxt``, written and read as a pair.

``zoo``, ``export`` and ``serve`` import this package; it imports none of them, nor torch, so a
server that holds only onnxruntime reads and preprocesses exactly as the exporter wrote.
"""
