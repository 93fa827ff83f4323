"""A small client for ``python -m serve``: a Python API and ``python -m serve.client IMAGE...``.

    from serve.client import Classifier
    with Classifier("127.0.0.1:50051") as c:
        result = c.classify("cat.jpg", top_k=3)          # a path, encoded bytes or an ndarray
        print(result.top.label, result.top.score, result.timing)
        results = c.classify_many(["a.jpg", "b.png"])    # one pipelined ClassifyStream

An ndarray is sent as a tensor: ``uint8`` as raw ``[H, W, C]`` pixels (the server preprocesses
them like a decoded image), float as a model-ready ``[C, H, W]`` or ``[1, C, H, W]``. A PIL image
is sent as a lossless PNG, exactly as if it had been saved to a file and the file given.

A model is named ``NAME`` (the newest version the server serves) or ``NAME:VERSION``, as
``python -m serve --model`` names them; ``version=N`` says the same.

Several replicas behind one client-side load balancer: the target may be a comma-separated list
``"10.0.0.5:50051,10.0.0.6:50051"`` or ``"dns:///serve.ns.svc.cluster.local:50051"`` (every
address the name resolves to, e.g. a Kubernetes headless Service); both spread calls round robin
over the servers that report SERVING on gRPC health (:func:`channel_target`), so a server that is
shutting down gets no new calls.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import grpc
import numpy as np

from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from contract.cli import HelpFormatter
from contract.names import split_model_ref

PROG = "python -m serve.client"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 2**20  # the server sets the real limit; the client only must not be the tighter one
# Several servers: round robin per call (gRPC's default, pick_first, would send everything to one
# server), over the servers whose grpc.health.v1 Watch says SERVING: one that is draining on
# SIGTERM (python -m serve --drain-delay) gets no new calls while it finishes the ones it has.
# A server without the health service counts as healthy.
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                                  "healthCheckConfig": {"serviceName": ""}}))

Input = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]  # noqa: F821 (PIL only when the caller has it)


def split_model(model: str, version: int = 0) -> tuple[str, int]:
    """``("NAME", VERSION)`` for ``NAME`` or ``NAME:VERSION`` (the server's ``--model`` syntax).

    Raises:
        ValueError: a version that is not a positive integer, or one given twice differently.
    """
    if ":" not in model:
        return model, version
    name, named = split_model_ref(model)
    if named is None:
        raise ValueError(f"invalid model {model!r}: expected NAME or NAME:VERSION with VERSION a positive integer")
    if version and version != named:
        raise ValueError(f"model {model!r} names version {named} but version={version} was given")
    return name, named


def _pil_image(x: Any) -> Any:
    """``x`` if it is a PIL image, else None. PIL is looked up only where the caller imported it."""
    image_module = sys.modules.get("PIL.Image")
    return x if image_module is not None and isinstance(x, image_module.Image) else None


def _png_bytes(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ClientError(Exception):
    """A failed call: ``code`` (grpc.StatusCode) and the server's message.

    ``message`` is the server's text plus, where one applies, a ``hint`` in parentheses (a
    plaintext call that found no server, or a server that refused a message as too large).
    ``index`` and ``path``: the item of :meth:`Classifier.classify_many` (or the file given to
    :meth:`Classifier.classify`) the error is about, None when it is about the whole call;
    ``str(error)`` names them.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, hint: str = "", index: int | None = None,
                 path: str | None = None) -> None:
        self.code, self.details, self.hint, self.index, self.path = code, message, hint, index, path
        self.message = f"{message} ({hint})" if hint else message
        where = []
        if index is not None:
            where.append(f"item {index}")
        if path is not None:
            where.append(path if index is None else f"({path})")
        super().__init__(f"{' '.join(where) + ': ' if where else ''}{code.name}: {self.message}")


@dataclass
class Prediction:
    index: int
    label: str
    score: float


@dataclass
class Result:
    """One answer: ``classes`` best first, server-side ``timing`` in microseconds."""

    classes: list[Prediction]
    model: str
    version: int
    provider: str
    batch_size: int
    timing: dict[str, int]
    request_id: str = ""
    logits: list[float] | None = None

    @property
    def top(self) -> Prediction:
        return self.classes[0]

    @classmethod
    def from_proto(cls, r: Any) -> "Result":
        t = r.timing
        return cls(classes=[Prediction(c.index, c.label, c.score) for c in r.classes], model=r.model,
                   version=r.version, provider=r.provider, batch_size=r.batch_size, request_id=r.request_id,
                   timing=dict(decode=t.decode_us, preprocess=t.preprocess_us, queue=t.queue_us,
                               inference=t.inference_us, total=t.total_us),
                   logits=list(r.logits) if len(r.logits) else None)


_DTYPES = {np.dtype(np.uint8): "uint8", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}
_CODES = {c.value[0]: c for c in grpc.StatusCode}  # ItemError.code number -> StatusCode


def make_request(x: Input, model: str = "", top_k: int = 0, version: int = 0, request_id: str = "",
                 return_logits: bool = False) -> Any:
    """A ``ClassifyRequest`` for a path, encoded image bytes, an ndarray or a PIL image; ``model``
    may be ``NAME:VERSION`` (see :func:`split_model`)."""
    model, version = split_model(model, version)
    request = pb.ClassifyRequest(model=model, version=version, top_k=top_k, request_id=request_id,
                                 return_logits=return_logits)
    if _pil_image(x) is not None:
        request.image = _png_bytes(x)
    elif isinstance(x, np.ndarray):
        array = x if x.dtype in _DTYPES else x.astype(np.float32)
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        request.tensor.CopyFrom(pb.Tensor(shape=list(array.shape), dtype=_DTYPES[np.dtype(array.dtype.name)],
                                          data=array.tobytes()))
    elif isinstance(x, (bytes, bytearray, memoryview)):
        request.image = bytes(x)
    else:
        with open(x, "rb") as f:
            request.image = f.read()
    return request


def _path_of(x: Input) -> str | None:
    """The file name of an input given as a path, else None."""
    return os.fsdecode(x) if isinstance(x, (str, os.PathLike)) else None


# "Received message larger than max (27021117 vs. 16777216)": the server refused a request as
# too large; "Sent ..." is this client's own limit (MAX_MESSAGE_BYTES).
_TOO_LARGE = re.compile(r"(Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")
SERVER_LIMIT_FLAG = "python -m serve --max-message-mb"


def too_large(message: str) -> tuple[str, int, int] | None:
    """``("server" | "client", message bytes, limit bytes)`` for a message-size error, else None."""
    m = _TOO_LARGE.search(message)
    if m is None:
        return None
    return ("server" if m.group(1) == "Received" else "client"), int(m.group(2)), int(m.group(3))


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


def too_large_hint(message: str) -> str:
    """Which limit a message-size error hit and how to raise it ("" for other messages)."""
    found = too_large(message)
    if found is None:
        return ""
    side, _, limit = found
    if side == "server":
        return f"the server accepts messages up to {_bytes(limit)}, set by {SERVER_LIMIT_FLAG}"
    return f"this client sends messages up to {_bytes(limit)}"


def _split_host_port(entry: str) -> tuple[str, str]:
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid server address {entry!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    return host.strip("[]"), port


def channel_target(target: str, tls: bool = False) -> tuple[str, list[tuple[str, Any]]]:
    """The grpc target and extra channel options for ``target``.

    Args:
        target: ``HOST:PORT`` (one server, as is); ``HOST:PORT,HOST:PORT,...`` (several servers:
            host names are resolved once, here, and the addresses become one ``ipv4:`` or
            ``ipv6:`` target); or a ``dns:///NAME:PORT`` target (grpc resolves NAME, and again
            when connections fail, so replicas that come and go are followed). Lists and
            ``dns:`` targets balance calls round robin.
        tls: with a list, the first entry's host name (if it is one) is the TLS authority the
            servers' certificates must name.

    Raises:
        ValueError: a malformed entry, an unresolvable host, or IPv4 and IPv6 mixed.
    """
    target = target.strip()
    if target.startswith("dns:"):
        return target, [ROUND_ROBIN]
    if target.startswith(("ipv4:", "ipv6:")):  # already a grpc address list
        return target, [ROUND_ROBIN] if "," in target else []
    entries = [e.strip() for e in target.split(",") if e.strip()]
    if len(entries) <= 1 or target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return target, []
    addresses, first_host = [], None
    for entry in entries:
        host, port = _split_host_port(entry)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            first_host = first_host or f"{host}:{port}"
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ValueError(f"cannot resolve {host!r} in server list {target!r}: {e.strerror or e}") from None
            v4 = [i for i in infos if i[0] == socket.AF_INET]
            ip = ipaddress.ip_address((v4 or infos)[0][4][0])
        addresses.append((ip, port))
    versions = {ip.version for ip, _ in addresses}
    if len(versions) > 1:
        raise ValueError(f"server list {target!r} mixes IPv4 and IPv6 addresses; use one family")
    if versions == {4}:
        uri = "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in addresses)
    else:
        uri = "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in addresses)
    options: list[tuple[str, Any]] = [ROUND_ROBIN]
    if tls and first_host is not None:
        options.append(("grpc.default_authority", first_host))
    return uri, options


# Added to UNAVAILABLE when the call was plaintext: a TLS server closes a plaintext connection
# ("Socket closed"), which says nothing about TLS.
TLS_HINT = "is the server using TLS? pass tls_ca= or tls=True; python -m serve.client: --tls-ca"


# How a TLS server's end of a plaintext connection reads in grpc's UNAVAILABLE details.
_CLOSED_BY_PEER = ("Socket closed", "Connection reset", "handshake", "Broken pipe")


def tls_may_help(code: grpc.StatusCode, details: str, secure: bool) -> bool:
    """A plaintext call whose connection the other end closed: what a TLS server does. Not a
    refused connection (nothing listens), nor an UNAVAILABLE the server sent itself (draining)."""
    return (code == grpc.StatusCode.UNAVAILABLE and not secure
            and any(marker in details for marker in _CLOSED_BY_PEER))


def _about_input(details: str) -> bool:
    """The server's INVALID_ARGUMENT is about the image or tensor sent (serve.preprocess's
    messages), not about the request's other fields (model, version, top_k)."""
    return details.startswith(("image", "not a readable image", "cannot decode image", "unsupported channel",
                               "tensor", "uint8 tensor", "request has no input"))


def _error(e: grpc.RpcError, secure: bool = True, requests: Sequence[Any] = (),
           paths: Sequence[str | None] = (), many: bool = False) -> ClientError:
    """The ClientError for a failed call with ``requests`` (made from inputs whose file names are
    ``paths``, None where not a path): it names the request a message-size error is about, and
    with one request (``many`` False) the file of an INVALID_ARGUMENT too."""
    code, details = e.code(), e.details() or ""
    hint, index = "", None
    if tls_may_help(code, details, secure):
        hint = TLS_HINT
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and (found := too_large(details)):
        hint = too_large_hint(details)
        _, size, limit = found
        sizes = [r.ByteSize() for r in requests]
        index = next((i for i, n in enumerate(sizes) if n == size), None)
        if index is None:
            index = next((i for i, n in enumerate(sizes) if n > limit), None)
    elif code == grpc.StatusCode.INVALID_ARGUMENT and len(requests) == 1 and not many and _about_input(details):
        index = 0
    path = paths[index] if index is not None and index < len(paths) else None
    return ClientError(code, details, hint=hint, index=index if many else None, path=path)


class Classifier:
    """A connection to a ``zoo.serving.v1.Classifier`` server.

    Args:
        target: ``HOST:PORT``; or several servers, round robin per call: ``HOST:PORT,HOST:PORT``
            or ``dns:///NAME:PORT`` (see :func:`channel_target`).
        token: sent as ``authorization: Bearer TOKEN``; surrounding whitespace (the newline at the
            end of a token file) is dropped, as the server drops it from its own file.
        tls_ca: PEM bytes or a file path of the CA that signed the server's certificate; turns TLS on.
        tls: TLS with the system's CAs (when ``tls_ca`` is not given).
        timeout: default seconds per call.
        own_connection: open a connection of its own. By default gRPC shares one connection among
            a process's channels to the same target; ``python -m serve --workers N`` spreads
            connections (not calls) over its workers, so clients in one process reach several
            workers only with connections of their own.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 tls_ca: bytes | str | os.PathLike | None = None, tls: bool = False,
                 timeout: float = DEFAULT_TIMEOUT_S, own_connection: bool = False) -> None:
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() or not c.isprintable() for c in token):
                raise ValueError("invalid token: it must be one non-empty word of printable characters "
                                 "(gRPC metadata cannot carry spaces or control characters)")
        secure = tls_ca is not None or tls
        grpc_target, balancing = channel_target(target, tls=secure)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *balancing]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if secure:
            ca = tls_ca
            if ca is not None and not isinstance(ca, bytes):
                with open(ca, "rb") as f:
                    ca = f.read()
            self.channel = grpc.secure_channel(grpc_target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self.channel = grpc.insecure_channel(grpc_target, options)
        self.target, self.timeout, self.secure = target, timeout, secure
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def classify(self, x: Input, model: str = "", top_k: int = 5, version: int = 0, request_id: str = "",
                 return_logits: bool = False, timeout: float | None = None) -> Result:
        """Classify one image (path or encoded bytes) or ndarray. Raises :class:`ClientError`."""
        request = make_request(x, model, top_k, version, request_id, return_logits)
        try:
            response = self.stub.Classify(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e, self.secure, [request], [_path_of(x)]) from None
        return Result.from_proto(response)

    def classify_many(self, inputs: Iterable[Input], model: str = "", top_k: int = 5, version: int = 0,
                      return_logits: bool = False, timeout: float | None = None,
                      raise_on_error: bool = True) -> list[Result | ClientError]:
        """Classify many inputs over one pipelined ClassifyStream; results in input order.

        With ``raise_on_error=False`` a failed item is returned as its :class:`ClientError`
        (the others still succeed); otherwise the first failure is raised. Either way the error
        names the item (``index``, and ``path`` for an input given as a path).

        Every input is read and encoded before the stream starts: a file that cannot be read
        raises its OSError (FileNotFoundError naming the path, as :meth:`classify` does) and
        nothing is sent.
        """
        inputs = list(inputs)
        requests = [make_request(x, model, top_k, version, str(i), return_logits) for i, x in enumerate(inputs)]
        paths = [_path_of(x) for x in inputs]
        out: list[Result | ClientError] = []
        try:
            for item in self.stub.ClassifyStream(iter(requests), timeout=timeout or self.timeout,
                                                 metadata=self._metadata):
                if item.WhichOneof("result") == "error":
                    index = int(item.request_id) if item.request_id.isdigit() else len(out)
                    err = ClientError(_CODES.get(item.error.code, grpc.StatusCode.UNKNOWN), item.error.message,
                                      index=index, path=paths[index] if index < len(paths) else None)
                    if raise_on_error:
                        raise err
                    out.append(err)
                else:
                    out.append(Result.from_proto(item.response))
        except grpc.RpcError as e:
            raise _error(e, self.secure, requests, paths, many=True) from None
        return out

    def list_models(self, timeout: float | None = None) -> Any:
        """The server's ``ListModelsResponse``."""
        try:
            return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout,
                                        metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e, self.secure) from None

    def latency_report(self, model: str = "", timeout: float | None = None) -> Any:
        """The server's ``LatencyReportResponse``."""
        try:
            return self.stub.GetLatencyReport(pb.LatencyReportRequest(model=model), timeout=timeout or self.timeout,
                                              metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e, self.secure) from None



# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify images with a python -m serve server.",
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="JPEG, PNG, BMP or WebP files")
    p.add_argument("--model", default="", metavar="NAME[:VERSION]",
                   help="model as NAME or NAME:VERSION (no VERSION: the newest served; no --model: the server's "
                        "only model)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument("--server", default=DEFAULT_TARGET, metavar="HOST:PORT",
                   help="the server; or several, round robin per call: HOST:PORT,HOST:PORT,... or dns:///NAME:PORT")
    p.add_argument("--token-file", metavar="FILE", help="bearer token for a server started with --auth-token-file")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the server's (turns TLS on)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the whole run")
    p.add_argument("--latency-report", action="store_true",
                   help="instead of classifying, print the server's latency report (of --model, else of every "
                        "model): percentiles, FLOPs and, for a depthwise model served beside its dense twin, "
                        "the FLOPs ratio, the inference latency ratio and the gap")
    return p


def _ratio(v: float, fmt: str = ".3f", unit: str = "") -> str:
    return format(v, fmt) + unit if v else "-"  # 0 in the report: not known


def format_latency_report(report: Any) -> str:
    """A ``LatencyReportResponse`` as a table (milliseconds; GFLOPs at batch 1, a multiply-add
    counts as 2). For a depthwise model whose dense twin the server serves too: the FLOPs ratio,
    the inference latency ratio (p50, model over twin) and the gap, as ``bench.latency`` prints
    them."""
    def ms(p: Any) -> str:
        return f"{p.p50_us / 1e3:.3f}/{p.p90_us / 1e3:.3f}/{p.p99_us / 1e3:.3f}"

    headers = ["model", "requests", "total p50/p90/p99 ms", "queue p50 ms", "inference p50/p90/p99 ms",
               "mean batch", "GFLOPs", "dense twin", "FLOPs ratio", "latency ratio", "gap"]
    body = [[m.model, f"{m.count}/{m.total_requests}", ms(m.total), f"{m.queue.p50_us / 1e3:.3f}", ms(m.inference),
             f"{m.mean_batch_size:.2f}", _ratio(m.flops / 1e9), m.twin_model or (f"{m.dense_twin} (not served)"
                                                                                  if m.dense_twin else "-"),
             _ratio(m.flops_ratio), _ratio(m.latency_ratio), _ratio(m.gap, ".2f", "x")] for m in report.models]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(headers), line(["-" * w for w in widths]), *(line(r) for r in body),
             "requests: in the window / since the server started"]
    if any(m.twin_model for m in report.models):
        lines.append("gap = latency ratio / FLOPs ratio (inference p50 and FLOPs, depthwise model over its dense "
                     "twin): cost of a FLOP, depthwise over dense")
    return "\n".join(lines)


def format_result(name: str, r: Result) -> str:
    width = max([len("label")] + [len(c.label) for c in r.classes])
    lines = [f"{name}  ({r.model} v{r.version}, {r.provider}, batch {r.batch_size})",
             f"  {'label'.ljust(width)}  score"]
    lines += [f"  {c.label.ljust(width)}  {c.score:.4f}" for c in r.classes]
    lines.append("  timing (us): " + "  ".join(f"{k} {v}" for k, v in r.timing.items()))
    return "\n".join(lines)


def _about_the_image(e: ClientError) -> bool:
    """Whether a failed Classify is about the image sent (not the server, the model or the call)."""
    return (e.code == grpc.StatusCode.INVALID_ARGUMENT and _about_input(e.details)) or too_large(e.details) is not None


def describe_error(e: ClientError, tls: bool) -> str:
    """``CODE: the server's first line (hint)``, one line, the hints worded for the CLI's flags."""
    first = e.details.splitlines()[0] if e.details else ""
    if tls_may_help(e.code, e.details, tls):
        first += " (is the server using TLS? pass --tls-ca)"
    elif too_large(e.details):
        first += f" ({too_large_hint(e.details)})"
    return f"{e.code.name}: {first}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.latency_report and args.images:
        parser.error("--latency-report classifies nothing: drop the IMAGE arguments")
    if not args.images and not args.latency_report:
        parser.error("the following arguments are required: IMAGE (or --latency-report)")
    if args.top_k < 1:
        parser.error(f"Invalid --top-k: {args.top_k} (at least 1)")
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            parser.error(f"--token-file {args.token_file}: {e.strerror or e}")
    try:
        split_model(args.model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    if args.tls_ca and not os.path.isfile(args.tls_ca):
        parser.error(f"--tls-ca {args.tls_ca}: no such file")
    images = []
    for path in args.images:
        try:
            with open(path, "rb") as f:
                images.append(f.read())
        except OSError as e:
            print(f"{PROG}: error: cannot read {path}: {e.strerror or e}", file=sys.stderr)
            return 2
    try:
        channel_target(args.server)
    except ValueError as e:
        parser.error(f"--server: {e}")
    try:
        with Classifier(args.server, token=token, tls_ca=args.tls_ca, timeout=args.timeout) as client:
            if args.latency_report:
                print(format_latency_report(client.latency_report(args.model)))
                return 0
            if len(images) == 1:
                try:
                    results: list[Result | ClientError] = [client.classify(images[0], args.model, args.top_k)]
                except ClientError as e:
                    if not _about_the_image(e):
                        raise
                    results = [e]  # reported like one of several files: named
            else:
                results = client.classify_many(images, args.model, args.top_k, raise_on_error=False)
    except ClientError as e:
        if e.index is not None:  # a stream-level error about one file (too large)
            where = f"{args.images[e.index]}: "
        elif e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            where = f"server {args.server}: "
        else:
            where = ""
        print(f"{PROG}: error: {where}{describe_error(e, tls=bool(args.tls_ca))}", file=sys.stderr)
        return 1
    failed = 0
    for path, r in zip(args.images, results):
        if isinstance(r, ClientError):
            failed += 1
            print(f"{path}: error: {describe_error(r, tls=bool(args.tls_ca))}", file=sys.stderr)
        else:
            print(format_result(path, r))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
