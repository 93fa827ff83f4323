"""The peer of ``python -m serve`` in the benchmark: KServe's Python model server on the same model.

KServe is no dependency of this project (it pins a protobuf older than this project's stubs
need): it runs from an environment of its own, ``make kserve-env`` (``.venv-kserve``), or the
Python that ``$ZOO_KSERVE_PYTHON`` names (:func:`default_python`). That Python runs
:data:`MODEL_SCRIPT` by path: a minimal ``kserve.Model`` whose ``predict`` calls ``session.run``,
with the onnxruntime session options ``serve`` builds (:func:`serve.runtime.session_options`, read
here and passed on), serving the model under the name ``serve`` gives it, so one Open Inference
Protocol ``ModelInfer`` client drives both.

How KServe runs it: one process; gRPC (``grpc.aio``) and HTTP (uvicorn) share one asyncio event
loop, and a synchronous ``predict`` runs on that loop, so the model runs one request at a time on
the thread that took it, with onnxruntime's intra-op threads inside, and nothing is batched.
``--max_threads`` sizes an executor the asynchronous gRPC servicer does not use, and
``--workers`` forks HTTP servers only; neither changes the gRPC side, so the peer runs with one.

KServe binds its gRPC port on every interface (``[::]``) and its HTTP port on ``0.0.0.0``, and
takes no port 0: the ports are picked free here. Ready once its gRPC ``ServerReady`` and
``ModelReady`` say so. Its per-request log lines are off (``--enable_latency_logging false``,
``KSERVE_LOGLEVEL=WARNING``, and uvicorn's access log in the script), as ``serve`` writes none.
It stops by itself when the process that started it is gone. :class:`PeerServer` has the
interface of :class:`bench.serve.servers.ServerProcess` (``label``, ``workers``, ``wait_ready``,
``cpu_seconds``, ``worker_connections``, ``stop``), so it slots in beside one.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

from bench.serve.config import HOST, REPO_ROOT, SERVER_START_TIMEOUT_S, BenchError
from bench.serve.servers import cpu_seconds, stop_process

MODEL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kserve_model.py")
KSERVE_VENV = os.path.join(REPO_ROOT, ".venv-kserve")
PYTHON_ENV = "ZOO_KSERVE_PYTHON"  # a Python with kserve and onnxruntime, instead of .venv-kserve's
# KServe's stop on SIGTERM waits up to its grace period for calls in flight (ModelServer's
# grace_period, which its command line cannot set); with nothing in flight it does not wait.
KSERVE_GRACE_S = 30.0
# onnxruntime's session config entries passed on when serve sets them (they cannot be listed).
SESSION_CONFIG_KEYS = (
    "session.intra_op.allow_spinning", "session.inter_op.allow_spinning", "session.set_denormal_as_zero",
    "session.intra_op_thread_affinities", "session.disable_prepacking", "session.use_env_allocators",
)
_SESSION_ATTRIBUTES = ("intra_op_num_threads", "inter_op_num_threads", "enable_cpu_mem_arena", "enable_mem_pattern",
                       "enable_mem_reuse", "use_deterministic_compute", "log_severity_level")


def default_python() -> str:
    """``$ZOO_KSERVE_PYTHON``, else ``.venv-kserve``'s Python (which may not exist)."""
    return os.environ.get(PYTHON_ENV) or os.path.join(KSERVE_VENV, "bin", "python")


def check_python(python: str) -> None:
    """BenchError, one line, unless ``python`` runs and has kserve and onnxruntime."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)) and not shutil.which(python):
        raise BenchError(f"no KServe Python at {python}: run `make kserve-env` (or set {PYTHON_ENV})")
    probe = ("import importlib.util as u; "
             "print(' and '.join(m for m in ('kserve', 'onnxruntime') if u.find_spec(m) is None))")
    try:
        done = subprocess.run([python, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"KServe Python {python} does not run: {e}") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        raise BenchError(f"KServe Python {python} does not run: {lines[-1] if lines else f'exit {done.returncode}'}")
    if done.stdout.strip():
        raise BenchError(f"KServe Python {python} has no {done.stdout.strip()}: run `make kserve-env`")


def serve_session_options(threads: int, spinning: bool = False) -> dict[str, Any]:
    """What :func:`serve.runtime.session_options` sets, as JSON for :data:`MODEL_SCRIPT`."""
    from serve.runtime import session_options

    opts = session_options(threads, spinning)
    spec: dict[str, Any] = {name: getattr(opts, name) for name in _SESSION_ATTRIBUTES}
    spec["graph_optimization_level"] = int(opts.graph_optimization_level)
    spec["execution_mode"] = int(opts.execution_mode)
    config = {}
    for key in SESSION_CONFIG_KEYS:
        with contextlib.suppress(RuntimeError):  # not set
            config[key] = opts.get_session_config_entry(key)
    spec["config"] = config
    return spec


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on every interface now (KServe binds them a moment later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PeerServer:
    """KServe's model server in a subprocess: readiness by gRPC, CPU time, a bounded stop."""

    def __init__(self, label: str, command: list[str], name: str, grpc_port: int, http_port: int) -> None:
        self.label, self.name, self.workers = label, name, 1
        self.port, self.http_port = grpc_port, http_port
        self.grpc_address, self.http_address = f"{HOST}:{grpc_port}", f"http://{HOST}:{http_port}"
        env = dict(os.environ, KSERVE_LOGLEVEL="WARNING", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"peer-{label}-output")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # drained to the end, so the server never blocks on a full pipe
            self.lines.append(line.rstrip("\n"))

    def _last_line(self) -> str:
        self._reader.join(2.0)
        return next((ln for ln in reversed(self.lines) if ln.strip()), "no message")

    def wait_ready(self, deadline: float) -> int:
        """The gRPC port, once ``ServerReady`` and ``ModelReady`` answer true; BenchError when the
        process exits first or ``deadline`` (``time.monotonic()``) passes."""
        import grpc

        from serve._proto.inference import grpc_predict_v2_pb2 as kpb
        from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc

        with grpc.insecure_channel(self.grpc_address) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"KServe peer ({self.label}) exited with status {self.proc.returncode} "
                                     f"before it was ready: {self._last_line()}")
                with contextlib.suppress(grpc.RpcError):
                    if (stub.ServerReady(kpb.ServerReadyRequest(), timeout=1.0).ready
                            and stub.ModelReady(kpb.ModelReadyRequest(name=self.name), timeout=1.0).ready):
                        return self.port
                if time.monotonic() > deadline:
                    raise BenchError(f"KServe peer ({self.label}) not ready after {SERVER_START_TIMEOUT_S:g} s: "
                                     f"{self._last_line()}")
                time.sleep(0.1)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def worker_connections(self, port: int) -> list[int] | None:
        return None  # one process: KServe's --workers multiplies its REST server only

    def stop(self) -> None:
        """SIGTERM, wait for KServe's stop (its grace), SIGKILL after ``KILL_AFTER_S`` more."""
        stop_process(self.proc, f"KServe peer ({self.label})", KSERVE_GRACE_S)
        self._reader.join(2.0)


def kserve_command(python: str, model_path: str, name: str, threads: int, grpc_port: int,
                   http_port: int, spinning: bool = False) -> list[str]:
    return [python, MODEL_SCRIPT, "--model_path", model_path, "--model_name", name,
            "--session_options", json.dumps(serve_session_options(threads, spinning)),
            "--parent_pid", str(os.getpid()), "--grpc_port", str(grpc_port), "--http_port", str(http_port),
            "--workers", "1", "--enable_latency_logging", "false", "--enable_docs_url", "false"]


def start_kserve(python: str, model_path: str, name: str, threads: int, label: str = "kserve",
                 spinning: bool = False) -> PeerServer:
    """KServe's model server on ``model_path`` as ``name``, started (not yet ready: call
    :meth:`PeerServer.wait_ready`); BenchError, one line, when ``python`` has no kserve."""
    check_python(python)
    if not os.path.isfile(model_path):
        raise BenchError(f"no model file {model_path} for the KServe peer")
    grpc_port, http_port = free_ports(2)
    return PeerServer(label, kserve_command(python, os.path.abspath(model_path), name, threads, grpc_port, http_port,
                                             spinning),
                      name, grpc_port, http_port)
