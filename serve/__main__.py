"""``python -m serve --model-dir DIR``: serve an ONNX model repository over gRPC, and over HTTP/REST
with a web page on ``--http-port`` (:mod:`serve.http`).

Prints one line when ready (address; each model's version and precision, e.g. ``resnext_mini:3
fp16``; provider) so scripts can wait for it (:func:`serve.ready.parse_ready_line` reads it). SIGTERM or
SIGINT turn health NOT_SERVING and keep serving for ``--drain-delay`` seconds (clients that
balance on health move away; every call already sent is answered), then refuse new calls, let
in-flight ones finish within ``--grace`` seconds and exit 0. A second signal skips what is left
of both: calls still in flight are cancelled.
Exit status: 0 after a clean stop, 1 when the models or the address cannot be served (one line
naming the file or option), 2 for bad options.

``--workers N`` (N > 1) runs N server processes on one port: this process starts each as
``python -m serve ... --reuse-port`` (a fresh interpreter: it never forks a process that holds
gRPC or onnxruntime threads, and builds no server itself), forwards their output prefixed with
``[worker I pid P]``, prints one ready line once all of them are, forwards SIGTERM/SIGINT and
exits 0 when they all stopped cleanly. The kernel (SO_REUSEPORT) spreads new *connections* over
the workers; a worker that dies stops the others and exits 1, for the supervisor to restart.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from typing import Sequence

from PIL import Image

from contract.cli import HelpFormatter
from serve.model_control import MODEL_CONTROL_MODES, describe
from serve.preprocess import MAX_IMAGE_PIXELS
from serve.ready import PROG, http_part, parse_ready_line, ready_line, workers_ready_line
from serve.ready import address as _address
from serve.runtime import PROVIDER_CHOICES, RepositoryError, available_cores, load_repository
from serve.signals import Signals
from serve.server import (
    DEFAULT_BATCH_TIMEOUT_MS,
    DEFAULT_INSTANCES,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_POLL_SECS,
    MAX_MESSAGE_BYTES,
    create_server,
)

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is an explicit choice
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000  # Triton's: its clients and examples default to it
DEFAULT_GRACE_S = 10.0
# Long enough for calls already sent to reach a handler; set it to the health-check period of
# the load balancer in front (Kubernetes: the readiness probe's period) to move traffic first.
DEFAULT_DRAIN_DELAY_S = 1.0
# Set in each --workers child: the pid of the process that started it (a worker whose parent
# died stops itself instead of serving on as an orphan).
PARENT_ENV = "ZOO_SERVE_PARENT_PID"
CPUS_ENV = "ZOO_SERVE_CPUS"  # a --workers child's share of the cores ("0,1"), set by its parent
# Seconds a worker gets beyond --grace before the parent kills it.
WORKER_KILL_AFTER_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve the ONNX models of a model repository "
                                "(DIR/NAME/VERSION/model.onnx, as python -m export.onnx writes) over gRPC.",
                                formatter_class=HelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--model-dir", required=True, metavar="DIR", help="model repository root")
    m.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]",
                   help="serve only these (repeatable; VERSION pins one, else the newest; none given: every model)")
    m.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
                   help="Triton's: none serves what loads at start; poll follows the repository (a new version "
                        "directory or a replaced model.onnx loads, a removed one unloads) without a restart; explicit "
                        "loads and unloads on RepositoryModelLoad/Unload")
    m.add_argument("--repository-poll-secs", type=float, default=DEFAULT_POLL_SECS, metavar="SECONDS",
                   help="with --model-control-mode poll: seconds between two looks at the repository")
    m.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with --model-control-mode explicit: load this model at start (repeatable; '*': every model "
                        "in the repository, as Triton's --load-model=*; none: start empty)")
    m.add_argument("--default-model", default=None, metavar="NAME",
                   help="model for requests that name none (default: the only model, when there is one)")
    m.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto",
                   help="onnxruntime execution provider: auto takes CUDA when onnxruntime-gpu sees a GPU")
    m.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads per model instance (0: one per core)")
    m.add_argument("--instances", type=int, default=DEFAULT_INSTANCES,
                   help="model instances (onnxruntime sessions) per model whose config.pbtxt has no instance_group, "
                        "as Triton's instance_group count: as many batches run at once, each on its own session")
    m.add_argument("--ort-spinning", action="store_true",
                   help="let onnxruntime's intra-op threads spin while waiting for work (onnxruntime's default; "
                        "off here: a spinning thread takes the core that gRPC's threads and the clients need, "
                        "which shows in the one-client tail, python -m bench.serve)")
    m.add_argument("--no-warmup", action="store_true",
                   help="mark models ready without running them first (by default each load runs batch 1 and "
                        "--max-batch, or config.pbtxt's model_warmup, so the first requests are not the slow ones)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: pick a free one and print it)")
    n.add_argument("--http-port", type=int, default=None,
                   help=f"HTTP/REST port (the Open Inference Protocol's REST API, a classify route, the web page "
                        f"at /); default {DEFAULT_HTTP_PORT}, or a free one with --port 0 (0: pick a free one)")
    n.add_argument("--no-http", action="store_true", help="serve gRPC only")
    n.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                   help="Classify and ModelInfer calls + ClassifyStream streams in flight; "
                        "beyond it RESOURCE_EXHAUSTED")
    n.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20, help="largest request message")
    n.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port of --host (0: a free one); default off")
    n.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds in-flight calls get to finish on SIGTERM/SIGINT")
    n.add_argument("--drain-delay", type=float, default=DEFAULT_DRAIN_DELAY_S,
                   help="on SIGTERM/SIGINT, seconds to go on serving with health NOT_SERVING before new calls are "
                        "refused (balancers that watch health move traffic away; calls already sent are answered)")
    w = p.add_argument_group("scale-out on one machine")
    w.add_argument("--workers", type=int, default=1,
                   help="server processes sharing --port (SO_REUSEPORT); the kernel spreads connections over them. "
                        "--threads 0 then gives each model instance cores/(N x --instances) threads; worker I "
                        "serves metrics on --metrics-port + I (or a free port each with 0)")
    w.add_argument("--pin-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="run each of --workers on a share of the cores of its own (Linux; default on): its "
                        "threads stay there instead of crowding onto the other workers' cores, a shorter tail "
                        "under load")
    w.add_argument("--reuse-port", action="store_true",
                   help="share --port with other servers started with this flag (--workers sets it)")
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


def main(argv: Sequence[str] | None = None) -> int:
    cpus = os.environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        # Every thread there is (imports start some, numpy's BLAS pool), and first, so every thread
        # started later inherits it.
        share = {int(c) for c in cpus.split(",")}
        for thread in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(thread), share)
            except ProcessLookupError:  # ended meanwhile
                pass
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--port", args.port, 0), ("--threads", args.threads, 0),
                             ("--instances", args.instances, 1), ("--max-batch", args.max_batch, 1),
                             ("--max-concurrency", args.max_concurrency, 1),
                             ("--batch-timeout-ms", args.batch_timeout_ms, 0),
                             ("--grace", args.grace, 0), ("--drain-delay", args.drain_delay, 0),
                             ("--max-message-mb", args.max_message_mb, 0.001)):
        if not value >= low or not math.isfinite(value):
            parser.error(f"Invalid {flag}: {value} (at least {low})")
    if args.port > 65535 or (args.metrics_port is not None and not 0 <= args.metrics_port <= 65535):
        parser.error("ports are 0..65535")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        parser.error(f"Invalid --http-port: {args.http_port} (0..65535)")
    if args.no_http and args.http_port is not None:
        parser.error("--http-port and --no-http exclude each other")
    # Port 0 for gRPC (tests, scripts) picks a free HTTP port too, so such servers never collide on 8000.
    http_port = None if args.no_http else (args.http_port if args.http_port is not None
                                           else 0 if args.port == 0 else DEFAULT_HTTP_PORT)
    if http_port and http_port == args.port:
        parser.error(f"--http-port {http_port} is the gRPC --port too: give each its own")
    if args.load_model and args.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode explicit")
    load_all = "*" in args.load_model
    if load_all and (args.model or len(args.load_model) > 1):
        parser.error("--load-model '*' loads every model: it goes without other --load-model or --model")
    if args.model and args.model_control_mode == "poll":
        parser.error("--model does not go with --model-control-mode poll: the repository (and each config.pbtxt's "
                     "version_policy) decides what serves")
    if not args.repository_poll_secs > 0 or not math.isfinite(args.repository_poll_secs):
        parser.error(f"Invalid --repository-poll-secs: {args.repository_poll_secs} (more than 0)")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.workers < 1:
        parser.error(f"Invalid --workers: {args.workers} (at least 1)")
    if args.workers > 1 and args.metrics_port and args.metrics_port + args.workers - 1 > 65535:
        parser.error(f"--metrics-port {args.metrics_port} + {args.workers} workers runs past port 65535")
    tls = ((_read(parser, "--tls-key", args.tls_key), _read(parser, "--tls-cert", args.tls_cert))
           if args.tls_cert else None)
    token = None
    if args.auth_token_file:
        token = _read(parser, "--auth-token-file", args.auth_token_file).decode("utf-8", "replace").strip()
        if not token:
            parser.error(f"--auth-token-file {args.auth_token_file} is empty")
    if args.workers > 1:
        exposed = not _is_loopback(args.host) and not (tls and token)
        return run_workers(args, list(sys.argv[1:] if argv is None else argv), warn_exposed=exposed,
                           http_port=http_port)

    try:
        repo = load_repository(args.model_dir, providers=args.providers, threads=args.threads,
                               models=[] if load_all else args.model + args.load_model,
                               empty_ok=args.model_control_mode == "explicit" and not load_all,
                               warmup=not args.no_warmup, spinning=args.ort_spinning, instances=args.instances)
    except RepositoryError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    address = _address(args.host, args.port)
    try:
        server, port = create_server(repo, address, max_batch=args.max_batch, batch_timeout_ms=args.batch_timeout_ms,
                                     max_concurrency=args.max_concurrency, default_model=args.default_model, tls=tls,
                                     token=token, metrics_port=args.metrics_port,
                                     max_message_bytes=int(args.max_message_mb * 2**20), reuse_port=args.reuse_port,
                                     http_port=http_port, model_control=args.model_control_mode,
                                     poll_secs=args.repository_poll_secs)
        # Process-wide, so here and not in create_server: Pillow's own decompression-bomb guard
        # (an error at twice this) behind the explicit size check in preprocess.decode_image,
        # which refuses everything over it; Pillow's warning in between would only repeat that.
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        server.start()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1

    signals = Signals().install()
    default = server.default_model
    models = ", ".join(describe(m) + (" (default)" if m.name == default else "") for m in repo.all())
    providers = ", ".join(sorted({m.provider for m in repo.all()})) or ", ".join(repo.providers)
    models = models or "none yet (load them with RepositoryModelLoad)"
    security = ("TLS" if tls else "plaintext") + (", bearer token" if token else "")
    ready = ready_line(args.host, port, f"({security}); models {models}; provider {providers}; "
                                        f"max batch {args.max_batch}, timeout {args.batch_timeout_ms:g} ms")
    if server.core.models.warmed:
        ready += f"; warmed up in {server.core.models.warmup_s:.2f} s"
    elif not repo.warmup:
        ready += "; no warmup"
    if args.model_control_mode != "none":
        ready += f"; model control {args.model_control_mode}" + (
            f" every {args.repository_poll_secs:g} s" if args.model_control_mode == "poll" else "")
    if server.metrics_port is not None:
        ready += f"; metrics http://{_address(args.host, server.metrics_port)}/metrics"
    if server.http_port is not None:
        ready += http_part(args.host, server.http_port, tls is not None)
    print(ready, flush=True)
    if not _is_loopback(args.host) and not (tls and token) and PARENT_ENV not in os.environ:
        print(f"{PROG}: warning: listening on {args.host} without TLS and a token: anyone who reaches it can use it",
              file=sys.stderr, flush=True)
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    while not signals.wait(1, 0.5):
        if parent and os.getppid() != parent:  # the --workers parent is gone
            print(f"{PROG}: parent process {parent} exited", file=sys.stderr, flush=True)
            break
    signals.on(2, server.stop_now, name="second-signal")  # the first stops gracefully, a second at once
    if args.drain_delay > 0:
        print(f"{PROG}: draining: health NOT_SERVING, serving {args.drain_delay:g} s more", flush=True)
    server.begin_stop(args.grace, args.drain_delay)
    print(f"{PROG}: stopping: new calls refused, finishing in-flight ones (grace {args.grace:g} s)", flush=True)
    server.stop(args.grace)
    print(f"{PROG}: stopped" + (" (a second signal cancelled the calls still in flight)" if server.hurried else ""),
          flush=True)
    return 0


# --------------------------------------------------------------------------- --workers


def _reserve_port(host: str) -> socket.socket:
    """A socket bound (not listening) with SO_REUSEPORT to a free port of ``host``.

    It holds the port for the workers, who bind it with SO_REUSEPORT too; a socket that does
    not listen takes no connections, and it is closed once they all listen.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _worker_argv(argv: list[str], args: argparse.Namespace, index: int, port: int,
                 http_port: int | None = None) -> list[str]:
    """The child's options: the user's, then overrides (argparse keeps an option's last value)."""
    extra = ["--workers", "1", "--reuse-port", "--port", str(port)]
    if http_port is not None:
        extra += ["--http-port", str(http_port)]
    if args.threads == 0:
        extra += ["--threads", str(max(1, available_cores() // (args.workers * args.instances)))]
    if args.metrics_port:
        extra += ["--metrics-port", str(args.metrics_port + index)]
    return [sys.executable, "-m", "serve", *argv, *extra]


def core_shares(cores: Sequence[int], n: int) -> list[list[int]]:
    """``cores`` in ``n`` contiguous shares as even as they can be (worker I runs on share I); with
    fewer cores than workers, one core each, round-robin."""
    cores = sorted(cores)
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    starts = [i * size + min(i, extra) for i in range(n + 1)]
    return [cores[starts[i]:starts[i + 1]] for i in range(n)]


class _Worker:
    """One child server: its process, and a thread forwarding its output until it closes."""

    def __init__(self, index: int, command: list[str], cpus: Sequence[int] | None = None) -> None:
        self.index, self.cpus = index, cpus
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        env.pop(CPUS_ENV, None)  # a worker pinned by an outer parent does not pass its share on unasked
        if cpus:
            env[CPUS_ENV] = ",".join(map(str, cpus))
        # A process group of its own: a terminal's Ctrl-C goes to the foreground group, and a worker
        # in the parent's would count it and then the parent's SIGTERM as a second signal, cancelling
        # its calls instead of draining them. The parent alone hears it and passes it on once.
        # (A session of its own, which makes one: Popen's process_group needs Python 3.11.)
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
                                     start_new_session=True)
        self.ready = threading.Event()
        self.line = ""
        self._thread = threading.Thread(target=self._forward, name=f"worker-{index}-output", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        prefix = f"[worker {self.index} pid {self.proc.pid}] "
        for line in self.proc.stdout:
            print(prefix + line.rstrip("\n"), flush=True)
            if not self.ready.is_set() and parse_ready_line(line) is not None:
                self.line = line
                self.ready.set()

    def wait_ready(self, signals: Signals) -> bool:
        """True once it listens; False if it exited first or a signal arrived."""
        while not signals.count:
            if self.ready.wait(0.1):
                return True
            if self.proc.poll() is not None:
                self._thread.join(5)  # its last lines (the error) are printed before we go on
                return self.ready.is_set()
        return False

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{PROG}: worker {self.index} (pid {self.proc.pid}) did not stop within {timeout:g} s: killed",
                  file=sys.stderr, flush=True)
            self.proc.kill()
            code = self.proc.wait()
        self._thread.join(5)
        return code


def run_workers(args: argparse.Namespace, argv: list[str], warn_exposed: bool = False,
                http_port: int | None = None) -> int:
    """``--workers N``: N ``python -m serve`` processes on one port; returns the exit status."""
    signals = Signals().install()
    workers: list[_Worker] = []

    def pass_on() -> None:  # a second signal is passed on: the workers stop at once
        # As SIGINT: the first went as SIGTERM from the main loop, maybe moments ago, and a signal
        # still pending absorbs another of its kind, so a second SIGTERM could reach a worker as one.
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGINT)

    signals.on(2, pass_on, name="second-signal")
    reserved = None
    port = args.port
    if port == 0:
        try:
            reserved = _reserve_port(args.host)
        except OSError as e:
            print(f"{PROG}: error: cannot listen on {args.host}: {e.strerror or e}", file=sys.stderr)
            return 1
        port = reserved.getsockname()[1]
    reserved_http = None
    if http_port == 0:  # one free port for every worker's HTTP side too
        try:
            reserved_http = _reserve_port(args.host)
        except OSError as e:
            print(f"{PROG}: error: cannot listen on {args.host}: {e.strerror or e}", file=sys.stderr)
            return 1
        http_port = reserved_http.getsockname()[1]
    try:
        # The first worker alone: a bad repository or a taken port fails once, with one message.
        shares = (core_shares(os.sched_getaffinity(0), args.workers)
                  if args.pin_workers and hasattr(os, "sched_getaffinity") else [None] * args.workers)
        for index in range(args.workers):
            workers.append(_Worker(index, _worker_argv(argv, args, index, port, http_port), shares[index]))
            if index == 0 and not workers[0].wait_ready(signals):
                break
        started = all(w.wait_ready(signals) for w in workers) and len(workers) == args.workers
    finally:
        if reserved is not None:
            reserved.close()
        if reserved_http is not None:
            reserved_http.close()
    if started:
        pids = ", ".join(str(w.proc.pid) for w in workers)
        pinned = ("; cores " + " | ".join(",".join(map(str, w.cpus)) for w in workers)) if workers[0].cpus else ""
        print(workers_ready_line(args.workers, args.host, port,
                                 f"(pids {pids}; connections spread by SO_REUSEPORT{pinned})")
              + (http_part(args.host, http_port, bool(args.tls_cert)) if http_port is not None else ""), flush=True)
        if warn_exposed:
            print(f"{PROG}: warning: listening on {args.host} without TLS and a token: "
                  "anyone who reaches it can use it", file=sys.stderr, flush=True)
        failed = None
        while not signals.wait(1, 0.5):
            failed = next((w for w in workers if w.proc.poll() is not None), None)
            if failed is not None:
                print(f"{PROG}: error: worker {failed.index} (pid {failed.proc.pid}) exited with status "
                      f"{failed.proc.returncode}; stopping the others", file=sys.stderr, flush=True)
                break
    elif not signals.count:
        bad = next((w for w in workers if w.proc.poll() is not None), workers[-1])
        print(f"{PROG}: error: worker {bad.index} exited with status {bad.proc.returncode} before it was ready",
              file=sys.stderr, flush=True)
        failed = bad
    else:
        failed = None
    print(f"{PROG}: stopping {len(workers)} workers (drain {args.drain_delay:g} s, grace {args.grace:g} s)", flush=True)
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    codes = [w.finish(args.drain_delay + args.grace + WORKER_KILL_AFTER_S) for w in workers]
    print(f"{PROG}: stopped", flush=True)
    return 1 if failed is not None or any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
