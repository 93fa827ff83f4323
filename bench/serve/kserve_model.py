"""The peer server of ``bench.serve``: one ONNX model behind KServe's Python model server.

Run by the Python of an environment with kserve and onnxruntime (``make kserve-env`` builds
``.venv-kserve``), never by this project's: kserve pins a protobuf this project's stubs refuse, so
this file imports only kserve, onnxruntime, numpy and the standard library, and is started by path
(:func:`bench.serve.peer.start_kserve`)::

    .venv-kserve/bin/python bench/serve/kserve_model.py --model_path M.onnx --model_name resnext_mini \\
        --session_options '{"intra_op_num_threads": 1, ...}' --grpc_port 8081 --http_port 8080

A minimal custom model, as KServe's documentation writes one: ``predict`` runs ``session.run`` on
the request's input tensor and answers the logits. Every other option is KServe's own
(``kserve.model_server.parser``: ports, ``--max_threads``, ``--workers``, logging).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.model_server import parser as kserve_parser


def session_options(spec: dict[str, Any]) -> ort.SessionOptions:
    """``SessionOptions`` from the JSON the launcher wrote from ``serve``'s own options, so both
    servers run the model alike: attributes by name, ``config`` entries as onnxruntime's keys."""
    opts = ort.SessionOptions()
    for key, value in spec.items():
        if key == "config":
            for entry, text in value.items():
                opts.add_session_config_entry(entry, text)
        elif key == "graph_optimization_level":
            opts.graph_optimization_level = ort.GraphOptimizationLevel(value)
        elif key == "execution_mode":
            opts.execution_mode = ort.ExecutionMode(value)
        else:
            setattr(opts, key, value)
    return opts


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, options: dict[str, Any]) -> None:
        super().__init__(name)
        self.path, self.options = path, options
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, session_options(self.options),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: x})
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        out = InferOutput(name=self.output_name, shape=list(logits.shape), datatype="FP32", data=logits)
        if payload.from_grpc:  # KServe's gRPC side answers raw inputs with raw contents by itself
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out])
        # REST: Triton's binary extension when the request sets binary_data_output or an output's
        # binary_data, as serve answers (KServe's default is JSON whatever was asked).
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


def _exit_with_parent(parent: int) -> None:
    """A peer left running after the benchmark died would skew every later measurement."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve_parser])
    parser.add_argument("--model_path", required=True, help="the ONNX file")
    parser.add_argument("--session_options", default="{}", help="onnxruntime session options as JSON")
    parser.add_argument("--parent_pid", type=int, default=0, help="stop when this process is gone")
    args, _ = parser.parse_known_args()
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    model = OnnxModel(args.model_name, args.model_path, json.loads(args.session_options))
    server = kserve.ModelServer()  # configures KServe's logging, then ours overrides it
    # No line per request, as serve writes none: uvicorn's access log (per REST request) is off
    # here; the launcher turns off KServe's own (KSERVE_LOGLEVEL, --enable_latency_logging).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
