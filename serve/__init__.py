"""Serve exported ONNX models over gRPC on onnxruntime: ``python -m serve --model-dir DIR``.

- :mod:`serve.runtime`: the model repository, onnxruntime sessions and providers
- :mod:`serve.preprocess`: the image formats, size limits and wire tensors a server accepts
- :mod:`serve.batching`: the dynamic batcher
- :mod:`serve.core`: the serving core every protocol calls (names, slots, running a request, draining)
- :mod:`serve.model_control`: which versions are served (load, unload, poll, retire) and their batchers
- :mod:`serve.errors`: the one table from exceptions to the status a client gets
- :mod:`serve.classifier`: the ``zoo.serving.v1.Classifier`` servicer
- :mod:`serve.kserve`: the Open Inference Protocol (KServe v2 / Triton) ``GRPCInferenceService``
- :mod:`serve.server`: the server's lifecycle (build, drain, stop), health, reflection, auth
- :mod:`serve.ready`: the ready line ``python -m serve`` prints, written and parsed
- :mod:`serve.metrics`: Prometheus series and the latency report
- :mod:`serve.client`: a Python client and ``python -m serve.client IMAGE...``

The APIs are ``protos/zoo/serving/v1/classifier.proto`` and ``protos/inference/grpc_predict_v2.proto``;
its generated stubs live in ``serve._proto``. Nothing here imports torch, ``zoo`` or ``export``: the contract with the
exporter is the ONNX file, its metadata and the repository layout (:mod:`contract`).
"""
