"""``python -m serve --model-dir DIR``: serve an ONNX model repository over gRPC.

Prints one line when ready (address, models, provider) so scripts can wait for it; SIGTERM or
SIGINT stop accepting calls, let in-flight ones finish within ``--grace`` seconds and exit 0.
Exit status: 0 after a clean stop, 1 when the models or the address cannot be served (one line
naming the file or option), 2 for bad options.
"""
from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
import warnings
from typing import Sequence

from PIL import Image

from serve.preprocess import MAX_IMAGE_PIXELS
from serve.runtime import PROVIDER_CHOICES, RepositoryError, load_repository
from serve.server import (DEFAULT_BATCH_TIMEOUT_MS, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONCURRENCY, MAX_MESSAGE_BYTES,
                          create_server)

PROG = "python -m serve"
DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is an explicit choice
DEFAULT_PORT = 50051
DEFAULT_GRACE_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve the ONNX models of a model repository "
                                "(DIR/NAME/VERSION/model.onnx, as python -m export.onnx writes) over gRPC.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--model-dir", required=True, metavar="DIR", help="model repository root")
    m.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]",
                   help="serve only these (repeatable; VERSION pins one, default the newest); default: every model")
    m.add_argument("--default-model", default=None, metavar="NAME",
                   help="model for requests that name none (default: the only model, when there is one)")
    m.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto",
                   help="onnxruntime execution provider: auto takes CUDA when onnxruntime-gpu sees a GPU")
    m.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per model (0: one per core)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: pick a free one and print it)")
    n.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                   help="Classify calls + ClassifyStream streams in flight; beyond it RESOURCE_EXHAUSTED")
    n.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20, help="largest request message")
    n.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port of --host (0: a free one); default off")
    n.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds in-flight calls get to finish on SIGTERM/SIGINT")
    b = p.add_argument_group("dynamic batching")
    b.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="requests per onnxruntime call (1: off)")
    b.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT_MS,
                   help="longest a request waits for its batch to fill")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    s.add_argument("--auth-token-file", metavar="FILE",
                   help="require 'authorization: Bearer TOKEN' (TOKEN = the file's content); health checks stay open")
    return p


def _read(parser: argparse.ArgumentParser, flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        parser.error(f"{flag} {path}: {e.strerror or e}")
    raise AssertionError  # parser.error exits


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--port", args.port, 0), ("--threads", args.threads, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-concurrency", args.max_concurrency, 1), ("--batch-timeout-ms", args.batch_timeout_ms, 0),
                             ("--grace", args.grace, 0), ("--max-message-mb", args.max_message_mb, 0.001)):
        if value < low:
            parser.error(f"Invalid {flag}: {value} (at least {low})")
    if args.port > 65535 or (args.metrics_port is not None and not 0 <= args.metrics_port <= 65535):
        parser.error("ports are 0..65535")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = (_read(parser, "--tls-key", args.tls_key), _read(parser, "--tls-cert", args.tls_cert)) if args.tls_cert else None
    token = None
    if args.auth_token_file:
        token = _read(parser, "--auth-token-file", args.auth_token_file).decode("utf-8", "replace").strip()
        if not token:
            parser.error(f"--auth-token-file {args.auth_token_file} is empty")

    try:
        repo = load_repository(args.model_dir, providers=args.providers, threads=args.threads, models=args.model)
    except RepositoryError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    address = _address(args.host, args.port)
    try:
        server, port = create_server(repo, address, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms,
                                     max_concurrency=args.max_concurrency, default_model=args.default_model, tls=tls,
                                     token=token, metrics_port=args.metrics_port,
                                     max_message_bytes=int(args.max_message_mb * 2**20))
        # Process-wide, so here and not in create_server: Pillow's own decompression-bomb guard
        # (an error at twice this) behind the explicit size check in preprocess.decode_image,
        # which refuses everything over it; Pillow's warning in between would only repeat that.
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        server.start()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    default = server.servicer.default_model
    models = ", ".join(f"{m.name}:{m.version}" + (" (default)" if m.name == default else "") for m in repo.all())
    providers = ", ".join(sorted({m.provider for m in repo.all()}))
    security = ("TLS" if tls else "plaintext") + (", bearer token" if token else "")
    ready = (f"{PROG}: listening on {_address(args.host, port)} ({security}); models {models}; provider {providers}; "
             f"max batch {args.max_batch}, timeout {args.batch_timeout_ms:g} ms")
    if server.metrics_port is not None:
        ready += f"; metrics http://{_address(args.host, server.metrics_port)}/metrics"
    print(ready, flush=True)
    if not _is_loopback(args.host) and not (tls and token):
        print(f"{PROG}: warning: listening on {args.host} without TLS and a token: anyone who reaches it can use it",
              file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    server.begin_stop(args.grace)
    print(f"{PROG}: stopping: new calls refused, finishing in-flight ones (grace {args.grace:g} s)", flush=True)
    server.stop(args.grace)
    print(f"{PROG}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
