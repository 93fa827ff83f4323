"""Reliability fixtures for serving: the mini models of tests/serve, servers in-process or as
``python -m serve`` subprocesses, and a summary of figures printed at the end of the run.

``ZOO_RELIABILITY=full`` (``make reliability``) runs the full sizes; otherwise the quick subset
that ``make test`` runs.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

from serve.ready import parse_ready_line

# The serving fixtures (session-scoped mini-model export, in-process repository), shared.
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, exported, repo, running, tls_files  # noqa: F401

FULL = os.environ.get("ZOO_RELIABILITY", "") == "full"

# Lines for the closing summary (fuzz cases and codes, load figures, faults survived).
SUMMARY: list[str] = []


def report(line: str) -> None:
    SUMMARY.append(line)
    print(line, flush=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SUMMARY:
        terminalreporter.section("reliability figures")
        for line in SUMMARY:
            terminalreporter.write_line(line)


class ServeProcess:
    """``python -m serve ARGV`` in a subprocess, after its ready line."""

    def __init__(self, *argv: str, env: dict | None = None, timeout: float = 120) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: never fills and blocks the server
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env)
        self.line = self.proc.stdout.readline()
        ready = parse_ready_line(self.line)
        if ready is None:
            self.kill()
            raise AssertionError(f"no ready line: {self.line!r} {self.stderr()}")
        self.host, self.port = ready.host, ready.port
        self.pid = self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._err.close()


@pytest.fixture
def copy_models(exported, tmp_path) -> Iterator[str]:  # noqa: F811 (pytest injects the imported fixture by name)
    """A private copy of the model repository (tests delete or truncate files in it)."""
    root = tmp_path / "models"
    shutil.copytree(exported.root, root)
    yield str(root)


# --------------------------------------------------------------------------- a checking load generator


class Load:
    """Closed-loop clients on threads, each with its own channel and its own inputs.

    Every answer is checked against the logits onnxruntime gives for that client's input (the
    reference is computed in this process from ``model``); a wrong answer is a ``MISMATCH``.
    ``records[i]`` holds ``(t_sent, t_done, code_name)`` of every call of client ``i``.
    """

    def __init__(self, target: str, clients: int, model, *, inputs_per_client: int = 4, timeout: float = 30,
                 seed: int = 0) -> None:
        import numpy as np
        self.target, self.clients, self.timeout, self.name = target, clients, timeout, model.name
        self.inputs, self.wants = [], []
        for i in range(clients):
            xs = np.random.default_rng(seed * 100_000 + i).standard_normal(
                (inputs_per_client, *INPUT_SIZE)).astype(np.float32)
            self.inputs.append(xs)
            self.wants.append(model.run(xs))
        self.records: list[list[tuple[float, float, str]]] = [[] for _ in range(clients)]
        self.mismatches: list[str] = []
        self._stop = __import__("threading").Event()
        self._threads = []

    def start(self) -> "Load":
        import threading
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True, name=f"load-{i}")
                         for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 30)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    def _client(self, i: int) -> None:
        import time

        import grpc
        import numpy as np

        from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
        from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
        xs, wants, out = self.inputs[i], self.wants[i], self.records[i]
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            j = 0
            while not self._stop.is_set():
                k = j % len(xs)
                rid = f"{i}-{j}"
                request = pb.ClassifyRequest(model=self.name, request_id=rid, return_logits=True, top_k=1,
                                             tensor=pb.Tensor(shape=INPUT_SIZE, dtype="float32", data=xs[k].tobytes()))
                t0 = time.monotonic()
                try:
                    r = stub.Classify(request, timeout=self.timeout)
                    code = "OK"
                    if r.request_id != rid or not np.allclose(r.logits, wants[k], rtol=1e-4, atol=1e-4) \
                            or r.classes[0].index != int(np.argmax(wants[k])):
                        code = "MISMATCH"
                        self.mismatches.append(f"client {i} call {j}: {list(r.logits)[:3]} vs {wants[k][:3]}")
                except grpc.RpcError as e:
                    code = e.code().name
                out.append((t0, time.monotonic(), code))
                if code == "RESOURCE_EXHAUSTED":
                    time.sleep(0.002)
                elif code not in ("OK", "MISMATCH"):
                    time.sleep(0.05)  # refused (shutting down): do not spin
                j += 1

    def all(self) -> list[tuple[float, float, str]]:
        return sorted(r for rs in self.records for r in rs)

    def codes(self, since: float = 0.0, until: float = float("inf"), by_end: bool = False) -> "dict[str, int]":
        """Status codes of the calls that started (or, ``by_end``, finished) in [since, until)."""
        import collections
        return dict(collections.Counter(c for t0, t1, c in self.all() if since <= (t1 if by_end else t0) < until))
