"""The bare gRPC echo server ``python -m bench.serve`` measures beside the served settings.

    python -m bench.serve.echo [--host 127.0.0.1] [--port 0]

One generic unary method (:data:`bench.serve.protocols.ECHO_METHOD`) on a plain ``grpc.server``,
answering every request, whatever its bytes, with the same small reply, without deserializing
anything: a client's round trip to it is gRPC and the loopback network with no serving at all.
Prints one line ``bench.serve.echo: listening on HOST:PORT`` once it listens; stops on SIGTERM or
SIGINT, and by itself once the process that started it is gone.
"""
from __future__ import annotations

import argparse
import os
import re
from concurrent import futures
from typing import Any, Sequence

PROG = "bench.serve.echo"
_READY_RE = re.compile(re.escape(PROG) + r": listening on (\S+):(\d+)$")
THREADS = 4  # handler threads: its handler returns at once, so a few keep up with any number of clients
PARENT_POLL_S = 1.0


def parse_ready(line: str) -> Any:
    """The echo server's address as a :class:`serve.ready.ReadyLine`, or None for any other line."""
    from serve.ready import ReadyLine

    match = _READY_RE.match(line.strip())
    return None if match is None else ReadyLine(host=match.group(1), port=int(match.group(2)), workers=1)


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    from bench.serve.protocols import ECHO_METHOD, ECHO_REPLY
    from serve.client import MAX_MESSAGE_BYTES
    from serve.signals import Signals

    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    service, method = ECHO_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(lambda request, context: ECHO_REPLY)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=THREADS), handlers=[handler],
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    signals = Signals().install()
    parent = os.getppid()
    print(f"{PROG}: listening on {args.host}:{port}", flush=True)
    while not signals.wait(1, PARENT_POLL_S):
        if os.getppid() != parent:  # orphaned: whoever started it cannot stop it any more
            break
    server.stop(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
