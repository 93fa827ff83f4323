"""The clients of each protocol a setting can load the server with, and of the bare gRPC echo.

Each client sends one input ``[C, H, W]`` float32 at batch 1 and returns an :class:`Answer`: the
top class and its probability, which the client thread checks against its own expectation,
whatever the protocol. The Open Inference Protocol clients (``grpc-infer``, ``http``,
``http-json``) ask for the ``logits`` output and take the softmax here, in float64 like the
server's own; ``grpc`` asks ``Classify`` for the top class, which the server computes.

"""
from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bench.serve.config import ECHO, HTTP_PROTOCOLS
from contract.metadata import INPUT_NAME, OUTPUT_NAME

# --protocol: what each one sends (the README and --help say the same).
PROTOCOLS = {
    "grpc": "zoo Classify over gRPC (the tensor's bytes in; top class, score and the server's timing out)",
    "grpc-infer": "Open Inference Protocol ModelInfer over gRPC (raw_input_contents in, raw logits out)",
    "http": "Open Inference Protocol REST infer with Triton's binary tensor extension (binary in, binary logits out)",
    "http-json": "Open Inference Protocol REST infer with JSON tensors in and out",
}
ECHO_METHOD = "/bench.Echo/Echo"
ECHO_REPLY = b"\x01" * 64  # about a Classify answer's size
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"


@dataclass
class Answer:
    """One answer as the client thread checks it; ``timing`` (microseconds) and ``batch_size``
    only where the protocol carries them (Classify's answer does)."""

    top_class: int | None
    score: float
    timing: dict[str, int] | None = None
    batch_size: int | None = None


class ProtocolError(Exception):
    """An answer that is not what the protocol promises: counted under ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def top_of_logits(logits: np.ndarray) -> Answer:
    """The top class of a ``[1, classes]`` float32 logits answer and its softmax probability (float64)."""
    if logits.ndim != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
        raise ProtocolError("BAD_SHAPE", f"logits of shape {list(logits.shape)}, expected [1, classes]")
    z = logits[0].astype(np.float64)
    e = np.exp(z - z.max())
    p = e / e.sum()
    top = int(p.argmax())
    return Answer(top_class=top, score=float(p[top]))


def _input_spec(x: np.ndarray) -> dict[str, Any]:
    return {"name": INPUT_NAME, "datatype": "FP32", "shape": [1, *x.shape]}


class GrpcClassify:
    """``grpc``: :class:`serve.client.Classifier` (its own connection or the process's shared one)."""

    def __init__(self, target: str, timeout: float, own_connection: bool) -> None:
        from serve.client import Classifier

        self.client = Classifier(target, timeout=timeout, own_connection=own_connection)
        self.timeout = timeout

    def call(self, x: np.ndarray, model: str) -> Answer:
        r = self.client.classify(x, model=model, top_k=1, timeout=self.timeout)
        top = r.classes[0] if r.classes else None
        return Answer(top_class=None if top is None else top.index, score=top.score if top else float("nan"),
                      timing=r.timing, batch_size=r.batch_size)

    def close(self) -> None:
        self.client.close()


def _grpc_channel(target: str, own_connection: bool) -> Any:
    import grpc

    from serve.client import MAX_MESSAGE_BYTES

    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(target, options)


class GrpcInfer:
    """``grpc-infer``: OIP ``ModelInfer``, the tensor as ``raw_input_contents``, the logits raw."""

    def __init__(self, target: str, timeout: float, own_connection: bool) -> None:
        from serve._proto.inference import grpc_predict_v2_pb2 as pb
        from serve._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

        self.pb, self.timeout = pb, timeout
        self.channel = _grpc_channel(target, own_connection)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, x: np.ndarray, model: str) -> Answer:
        import grpc

        pb = self.pb
        request = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
            name=INPUT_NAME, datatype="FP32", shape=[1, *x.shape])],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)],
            raw_input_contents=[x.astype("<f4", copy=False).tobytes()])
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ProtocolError(e.code().name, e.details() or "") from None
        out = next((o for o in response.outputs if o.name == OUTPUT_NAME), None)
        if out is None or out.datatype != "FP32" or len(response.raw_output_contents) != len(response.outputs):
            raise ProtocolError("BAD_ANSWER", "no raw FP32 logits output in the answer")
        raw = response.raw_output_contents[list(response.outputs).index(out)]
        return top_of_logits(np.frombuffer(raw, "<f4").reshape([int(d) for d in out.shape]))

    def close(self) -> None:
        self.channel.close()


class _NoDelayConnection(http.client.HTTPConnection):
    """Nagle off on every (re)connection, as gRPC sets it on its own sockets."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HttpInfer:
    """``http`` / ``http-json``: ``POST /v2/models/{m}/infer`` on one keep-alive connection of
    this client thread's own (http.client reconnects after a failed call)."""

    def __init__(self, target: str, timeout: float, binary: bool) -> None:
        host, _, port = target.rpartition(":")
        self.conn = _NoDelayConnection(host.strip("[]"), int(port), timeout=timeout)
        self.binary = binary
        self.reused = False  # the connection has carried an answer: the server may have closed it since

    def _request(self, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        spec = _input_spec(x)
        if self.binary:
            data = x.astype("<f4", copy=False).tobytes()
            spec["parameters"] = {BINARY_SIZE: len(data)}
            # Per output and for the request, as Triton's client sends it (some servers read only one).
            output = {"name": OUTPUT_NAME, "parameters": {"binary_data": True}}
            head = json.dumps({"inputs": [spec], "outputs": [output],
                               "parameters": {"binary_data_output": True}}).encode()
            return head + data, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
        # orjson, as Triton's client uses rapidjson: Python's json would cost the client more than the server.
        spec["data"] = np.ascontiguousarray(x.ravel())
        output = {"name": OUTPUT_NAME, "parameters": {"binary_data": False}}
        body = orjson.dumps({"inputs": [spec], "outputs": [output]}, option=orjson.OPT_SERIALIZE_NUMPY)
        return body, {"Content-Type": "application/json"}

    def call(self, x: np.ndarray, model: str) -> Answer:
        body, headers = self._request(x)
        for attempt in (0, 1):
            try:
                self.conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed while idle between rounds (uvicorn: after
                # 65 s): once on a fresh connection, as HTTP clients do. Not an answer that failed.
                self.conn.close()
                if attempt or not self.reused:
                    raise
                self.reused = False
            except Exception:
                self.conn.close()  # the next call opens a fresh connection
                self.reused = False
                raise
        self.reused = True
        if response.status != 200:
            raise ProtocolError(f"HTTP_{response.status}", data[:200].decode("utf-8", "replace"))
        length = response.getheader(HEADER_LENGTH)
        head_end = int(length) if length is not None else len(data)
        doc = orjson.loads(data[:head_end])
        out = next((o for o in doc.get("outputs", []) if o.get("name") == OUTPUT_NAME), None)
        if out is None or out.get("datatype") != "FP32":
            raise ProtocolError("BAD_ANSWER", "no FP32 logits output in the answer")
        shape = [int(d) for d in out["shape"]]
        size = (out.get("parameters") or {}).get(BINARY_SIZE)
        if self.binary:
            if size is None or length is None:
                raise ProtocolError("BAD_ANSWER", "logits asked as binary data came back as JSON")
            logits = np.frombuffer(data, "<f4", count=size // 4, offset=head_end)
        else:
            if size is not None:
                raise ProtocolError("BAD_ANSWER", "logits asked as JSON came back as binary data")
            logits = np.asarray(out["data"], dtype=np.float32)
        return top_of_logits(logits.reshape(shape))

    def close(self) -> None:
        self.conn.close()


class Echo:
    """The bare gRPC round trip: the tensor's bytes to :mod:`bench.serve.echo`, its fixed reply back."""

    def __init__(self, target: str, timeout: float, own_connection: bool) -> None:
        self.channel = _grpc_channel(target, own_connection)
        self.method = self.channel.unary_unary(ECHO_METHOD)  # bytes in, bytes out: no (de)serializer
        self.timeout = timeout

    def call(self, x: np.ndarray, model: str) -> Answer:
        import grpc

        try:
            reply = self.method(x.tobytes(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise ProtocolError(e.code().name, e.details() or "") from None
        # The thread checks class and score like any answer: an exact reply stands for "matched".
        return Answer(top_class=-1 if reply == ECHO_REPLY else None, score=0.0)

    def close(self) -> None:
        self.channel.close()


def make_client(protocol: str, target: str, timeout: float, own_connection: bool) -> Any:
    if protocol == "grpc":
        return GrpcClassify(target, timeout, own_connection)
    if protocol == "grpc-infer":
        return GrpcInfer(target, timeout, own_connection)
    if protocol in HTTP_PROTOCOLS:
        return HttpInfer(target, timeout, binary=protocol == "http")
    if protocol == ECHO:
        return Echo(target, timeout, own_connection)
    raise ValueError(f"unknown protocol {protocol!r}")
