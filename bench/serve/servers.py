"""What is served: the model exported into the cache, the servers this run starts and stops
(``python -m serve``, ready once it prints its ready line) and the check of a ``--server`` given."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from bench import _common as common
from bench.serve.clients import softmax
from bench.serve.config import (
    CALL_TIMEOUT_S,
    EXPORT_TIMEOUT_S,
    HOST,
    HTTP_PROTOCOLS,
    PEERS,
    KILL_AFTER_S,
    PROG,
    REPO_ROOT,
    SCORE_RTOL,
    SERVER_GRACE_S,
    SERVER_START_TIMEOUT_S,
    TOP_K,
    BenchError,
    Config,
)
from serve.ready import parse_ready_line

TCP_ESTABLISHED = "01"  # the st column of /proc/net/tcp


def ensure_model(cfg: Config) -> str:
    """The repository root holding ``cfg.model``: ``--model-dir``, or ``--cache`` after exporting it
    there when absent or stale (:func:`bench._common.ensure_cached_export`), by ``python -m
    export.onnx`` in a subprocess: this process does not import torch."""
    if cfg.model_dir is not None:
        return os.path.abspath(cfg.model_dir)
    root = os.path.abspath(cfg.cache)

    def export_into(out: str) -> None:
        print(f"{PROG}: exporting {cfg.model} (random weights) into {root}", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "export.onnx", cfg.model, "--out", out, "--name", cfg.model,
                   "--version", str(common.CACHE_VERSION), "--latency-runs", "0", "--no-progress",
                   "--threads", str(cfg.threads)]
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=EXPORT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"export of {cfg.model} took over {EXPORT_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            raise BenchError(f"export of {cfg.model} failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no message'}")

    common.ensure_cached_export(root, cfg.model, export_into)
    return root


class ServerProcess:
    """``python -m serve ...`` in a subprocess: its ready line, CPU time and a bounded stop."""

    def __init__(self, label: str, command: list[str], workers: int = 1,
                 parse: Callable[[str], Any] = parse_ready_line) -> None:
        from serve.__main__ import PARENT_ENV

        self.label, self.workers, self.parse = label, workers, parse
        # With PARENT_ENV the server stops by itself if this process dies without stopping it.
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.port: int | None = None
        self.http_port: int | None = None  # the ready line's HTTP port, when the server has one
        self._ready = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True, name=f"server-{label}-output")
                         for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:  # drained to the end, so the server never blocks on a full pipe
            self.lines.append(line.rstrip("\n"))
            ready = self.parse(line)
            if ready is not None and not self._ready.is_set():
                self.port, self.http_port = ready.port, ready.http_port
                self._ready.set()

    def wait_ready(self, deadline: float) -> int:
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                for t in self._readers:
                    t.join(2.0)
                last = next((ln for ln in reversed(self.lines) if ln.strip()), "no message")
                raise BenchError(f"server ({self.label}) exited with status {self.proc.returncode} "
                                 f"before it was ready: {last}")
            if time.monotonic() > deadline:
                raise BenchError(f"server ({self.label}) not ready after {SERVER_START_TIMEOUT_S:g} s")
        assert self.port is not None
        return self.port

    def cpu_seconds(self) -> float | None:
        """CPU seconds so far of the server process and its ``--workers`` processes."""
        return cpu_seconds(self.proc.pid, children=self.workers > 1)

    def worker_connections(self, port: int) -> list[int] | None:
        """Open connections to ``port`` held by each ``--workers`` process, fewest first: the
        kernel (SO_REUSEPORT) hashes each new connection to one worker, so a few long-lived
        connections can split unevenly; None for a single process or where /proc cannot say."""
        if self.workers < 2:
            return None
        try:
            workers = _children(self.proc.pid)
            if len(workers) != self.workers:  # one exited or restarts, or /proc lists no children
                return None
            return sorted(connections_by_process(workers, port).values())
        except OSError:
            return None

    def stop(self) -> None:
        """SIGTERM, wait for its graceful stop, SIGKILL after ``KILL_AFTER_S`` more."""
        stop_process(self.proc, f"server ({self.label})", SERVER_GRACE_S)
        for t in self._readers:
            t.join(2.0)


def cpu_seconds(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds so far of ``pid`` and (``children``) its children, from Linux
    /proc; None where that cannot be read."""
    try:
        pids = [pid] + (_children(pid) if children else [])
        total = 0
        for p in pids:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def connections_by_process(pids: list[int], port: int) -> dict[int, int]:
    """For each of ``pids``, its established TCP connections whose local port is ``port``
    (Linux /proc: the sockets of /proc/net/tcp and tcp6, matched to the processes' descriptors).
    Raises OSError where /proc cannot say (no /proc/net/tcp, a process gone)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if table.endswith("6") and not os.path.exists(table):  # a kernel without IPv6
            continue
        with open(table, encoding="ascii") as f:
            next(f)  # the header
            for line in f:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == TCP_ESTABLISHED:
                    sockets.add(f"socket:[{fields[9]}]")
    out = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        count = 0
        for fd in os.listdir(fd_dir):
            try:
                count += os.readlink(os.path.join(fd_dir, fd)) in sockets
            except FileNotFoundError:  # that descriptor closed meanwhile
                continue
        out[pid] = count
    return out


def stop_process(proc: subprocess.Popen, what: str, grace_s: float) -> None:
    """SIGTERM, ``grace_s`` for its graceful stop plus ``KILL_AFTER_S``, then SIGKILL (said on stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s + KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            print(f"{PROG}: {what} (pid {proc.pid}) did not stop: killed", file=sys.stderr, flush=True)
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; a thread that ends while it is read is skipped)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def echo_command() -> list[str]:
    return [sys.executable, "-m", "bench.serve.echo", "--host", HOST, "--port", "0"]


def server_command(cfg: Config, root: str, max_batch: int, workers: int = 1) -> list[str]:
    """``python -m serve`` for one setting's server; with an HTTP protocol in the run, its HTTP port
    on too (port 0: the ready line names it)."""
    from serve.server import DEFAULT_MAX_CONCURRENCY

    # --drain-delay 0: the load has stopped before a server is stopped; nothing is left to drain.
    return [sys.executable, "-m", "serve", "--model-dir", root, "--model", cfg.model, "--host", HOST, "--port", "0",
            "--providers", "cpu", "--threads", str(max(1, cfg.threads // (workers * cfg.instances))),
            "--instances", str(cfg.instances), "--max-batch", str(max_batch),
            "--max-concurrency", str(max(DEFAULT_MAX_CONCURRENCY, max(cfg.concurrency))),
            "--grace", str(SERVER_GRACE_S), "--drain-delay", "0", "--workers", str(workers)] + (
        ["--http-port", "0"] if set(cfg.protocols) & set(HTTP_PROTOCOLS) else []) + (
        ["--ort-spinning"] if cfg.spinning else [])


def server_label(batching: str, workers: int) -> str:
    if batching in PEERS:
        return f"{batching} peer"
    return f"batching {batching}" + (f", {workers} workers" if workers > 1 else "")


def check_external(cfg: Config, model: Any, x: np.ndarray) -> int | None:
    """The ``--server``'s max batch for the model, after one answer matched the local copy's.

    Raises BenchError when the server is unreachable, does not serve the model, or serves a
    different one (every answer of the run would be a mismatch).
    """
    from serve.client import Classifier, ClientError

    want = softmax(model.run(x[None]))[0]
    try:
        with Classifier(cfg.server, timeout=CALL_TIMEOUT_S) as c:
            listed = c.list_models()
            info = next((m for m in listed.models if m.name == cfg.model), None)
            if info is None:
                raise BenchError(f"server {cfg.server} does not serve {cfg.model!r} "
                                 f"(it serves: {', '.join(m.name for m in listed.models) or 'nothing'})")
            got = c.classify(x, model=cfg.model, top_k=TOP_K).classes[0]
    except ClientError as e:
        raise BenchError(f"server {cfg.server}: {e.code.name}: {e.message}") from None
    if got.index != int(want.argmax()) or abs(got.score - want.max()) > SCORE_RTOL * want.max():
        raise BenchError(f"server {cfg.server} answers differently from the local {model.path} "
                         f"(class {got.index} vs {int(want.argmax())}): pass --model-dir of the repository it serves")
    return info.max_batch or None


def check_external_http(cfg: Config) -> None:
    """The ``--http-server`` answers model metadata for the model; its answers are checked one by
    one in the run like every other (a different model there shows as MISMATCH)."""
    import http.client

    host, _, port = (cfg.http_server or "").rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=CALL_TIMEOUT_S)
    try:
        conn.request("GET", f"/v2/models/{cfg.model}")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:  # e.g. the gRPC port given: HTTP/2 bytes back
        raise BenchError(f"--http-server {cfg.http_server}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"--http-server {cfg.http_server}: model {cfg.model!r}: HTTP {response.status} "
                         f"{body[:200].decode('utf-8', 'replace')}")
