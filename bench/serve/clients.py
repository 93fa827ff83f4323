"""The load: closed-loop client threads spread over spawned client processes, each answer checked
against what onnxruntime computed for its own input before any timing."""
from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bench.serve.config import (
    ECHO,
    CALL_TIMEOUT_S,
    CANDIDATES_PER_INPUT,
    CLIENT_START_TIMEOUT_S,
    COLOR_SCALE,
    INPUTS_PER_CLIENT,
    MIN_MARGIN,
    MISMATCH,
    NOISE_SCALE,
    SCORE_RTOL,
    BenchError,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, in float64: the server's softmax (serve.server.softmax) on every row."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def choose_inputs(run: Callable[[np.ndarray], np.ndarray], input_size: Sequence[int], rng: np.random.Generator,
                  n: int, chunk: int = 16) -> tuple[list[np.ndarray], list[tuple[int, float]]]:
    """``n`` distinct float32 inputs ``[C, H, W]`` and the expected (top class, its probability) of each.

    Candidates whose top class wins by less than ``MIN_MARGIN`` of the logit scale are dropped
    (unless too few remain); the rest are taken one class at a time, so the classes of
    consecutive inputs differ wherever the model allows it.
    """
    c = input_size[0]
    count = n * CANDIDATES_PER_INPUT
    candidates = (rng.standard_normal((count, c, 1, 1)) * COLOR_SCALE
                  + rng.standard_normal((count, *input_size)) * NOISE_SCALE).astype(np.float32)
    logits = np.concatenate([run(candidates[i:i + chunk]) for i in range(0, count, chunk)]).astype(np.float64)
    probs = softmax(logits)
    top = logits.argmax(axis=1)
    ordered = np.sort(logits, axis=1)
    margin = (ordered[:, -1] - ordered[:, -2]) / np.maximum(np.abs(logits).max(axis=1), np.finfo(np.float64).tiny)
    by_class: dict[int, list[int]] = collections.defaultdict(list)
    for i in np.flatnonzero(margin >= MIN_MARGIN):
        by_class[int(top[i])].append(int(i))
    picked: list[int] = []
    queues = [collections.deque(v) for _, v in sorted(by_class.items())]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.popleft())
    if len(picked) < n:  # too few clear winners: the clearest of the rest
        taken = set(picked)
        rest = [int(i) for i in np.argsort(-margin) if int(i) not in taken]
        picked += rest[:n - len(picked)]
    return ([np.ascontiguousarray(candidates[i]) for i in picked],
            [(int(top[i]), float(probs[i, top[i]])) for i in picked])


@dataclass
class ClientSpec:
    """What a client process needs: pickled to it by multiprocessing."""

    model_root: str
    model: str
    seed: int
    index: int  # of this process
    slots: int  # clients (threads) it may be asked to run at once
    send_inputs: bool = False  # return the first client's inputs (the parent's raw session.run uses them)
    own_connection: bool = False  # each client thread its own connection, not one per process


# What each answer in a window adds to its setting (the fields of _Records of the same names).
SERIES = ("latency_ms", "batch", "server_total_ms", "server_queue_ms", "server_inference_ms", "server_other_ms",
          "transport_ms", "serving_cost_ms")


@dataclass
class _Records:
    """One client thread's observations in one window."""

    latency_ms: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    server_total_ms: list[float] = field(default_factory=list)
    server_queue_ms: list[float] = field(default_factory=list)
    server_inference_ms: list[float] = field(default_factory=list)
    server_other_ms: list[float] = field(default_factory=list)
    transport_ms: list[float] = field(default_factory=list)
    serving_cost_ms: list[float] = field(default_factory=list)
    inference_share_s: float = 0.0  # sum over answers of inference time / batch size
    errors: collections.Counter = field(default_factory=collections.Counter)
    checked: int = 0
    capped: bool = False
    last_done: float = 0.0


class _LoadClient:
    """A client process's state: its inputs and expectations, and one Classifier per client thread."""

    def __init__(self, spec: ClientSpec) -> None:
        from serve.runtime import load_repository

        repo = load_repository(spec.model_root, providers="cpu", threads=1, models=[spec.model])
        model = repo.get(spec.model)
        assert model is not None
        self.model = spec.model
        rng = np.random.default_rng([spec.seed, spec.index])
        self.inputs, self.expected = choose_inputs(model.run, model.input_size, rng, spec.slots * INPUTS_PER_CLIENT)
        self.spec = spec
        self.clients: dict[str, list[Any]] = {}
        del repo, model  # the session is not needed any more: its memory goes back

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(inputs=len(self.inputs), classes=len({c for c, _ in self.expected}))
        if self.spec.send_inputs:
            out["first_inputs"] = self.inputs[:INPUTS_PER_CLIENT]
        return out

    def close(self) -> None:
        for clients in self.clients.values():
            for c in clients:
                c.close()

    def _classifiers(self, protocol: str, target: str, n: int) -> list[Any]:
        """``n`` clients of ``protocol`` to ``target``, kept for the next run. The gRPC channels of one
        process share one HTTP/2 connection (gRPC's global subchannel pool), as clients in one
        process would, unless ``own_connection``; an HTTP client has a keep-alive connection of its own."""
        from bench.serve.protocols import make_client

        clients = self.clients.setdefault(f"{protocol} {target}", [])
        while len(clients) < n:
            clients.append(make_client(protocol, target, CALL_TIMEOUT_S, self.spec.own_connection))
        return clients[:n]

    def run(self, target: str, clients: int, start_at: float, end_at: float, max_requests: int,
            protocol: str = "grpc") -> dict[str, Any]:
        """``clients`` closed-loop threads until ``end_at``; what they saw between ``start_at`` and ``end_at``."""
        classifiers = self._classifiers(protocol, target, clients)
        records = [_Records() for _ in range(clients)]
        cpu: list[float] = []
        threads = [threading.Thread(target=self._drive, args=(classifiers[t], t, start_at, end_at, max_requests,
                                                              records[t], protocol == ECHO),
                                    name=f"client-{t}", daemon=True)
                   for t in range(clients)]
        threads.append(threading.Thread(target=_meter_cpu, args=(start_at, end_at, cpu), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, end_at - time.time()) + CALL_TIMEOUT_S + 5.0)
        if any(t.is_alive() for t in threads):
            raise RuntimeError("client threads did not finish within the call deadline")
        merged: dict[str, Any] = {k: [] for k in SERIES}
        errors: collections.Counter = collections.Counter()
        for r in records:
            for k in merged:
                merged[k] += getattr(r, k)
            errors += r.errors
        merged.update(errors=dict(errors), checked=sum(r.checked for r in records),
                      inference_share_s=sum(r.inference_share_s for r in records),
                      capped=any(r.capped for r in records), last_done=max(r.last_done for r in records),
                      cpu_s=cpu[1] - cpu[0] if len(cpu) == 2 else None)
        return merged

    def _drive(self, client: Any, slot: int, start_at: float, end_at: float, max_requests: int,
               rec: _Records, echo: bool = False) -> None:
        from bench.serve.protocols import ProtocolError
        from serve.client import ClientError

        k = INPUTS_PER_CLIENT
        inputs, expected = self.inputs[slot * k:(slot + 1) * k], self.expected[slot * k:(slot + 1) * k]
        i = measured = 0
        while time.time() < end_at:
            if measured >= max_requests:
                rec.capped = True
                break
            x, (want_class, want_score) = inputs[i % k], expected[i % k]
            i += 1
            t0 = time.perf_counter()
            try:
                r = client.call(x, self.model)
            except ClientError as e:
                r, code = None, e.code.name
            except ProtocolError as e:
                r, code = None, e.code
            except Exception as e:  # not a status: still one failed request, and the loop goes on
                r, code = None, type(e).__name__
            latency = time.perf_counter() - t0
            done = time.time()
            rec.checked += 1
            if r is not None:
                if echo:
                    ok = r.top_class == -1  # the echo's reply, byte for byte
                else:
                    ok = r.top_class == want_class and abs(r.score - want_score) <= SCORE_RTOL * want_score
                code = None if ok else MISMATCH
            if code is not None:
                rec.errors[code] += 1
            if not start_at <= done < end_at or code is not None:
                continue
            measured += 1
            rec.last_done = done
            t = r.timing  # microseconds, measured by the server
            rec.latency_ms.append(latency * 1e3)
            if t is None:  # the protocol carries no server timing (only Classify's answer does)
                continue
            rec.batch.append(r.batch_size)
            rec.server_total_ms.append(t["total"] / 1e3)
            rec.server_queue_ms.append(t["queue"] / 1e3)
            rec.server_inference_ms.append(t["inference"] / 1e3)
            rec.server_other_ms.append((t["total"] - t["queue"] - t["inference"]) / 1e3)
            rec.transport_ms.append(latency * 1e3 - t["total"] / 1e3)
            rec.serving_cost_ms.append(latency * 1e3 - t["inference"] / 1e3)
            rec.inference_share_s += t["inference"] / 1e6 / max(r.batch_size, 1)


def _meter_cpu(start_at: float, end_at: float, out: list[float]) -> None:
    """This process's CPU seconds at ``start_at`` and at ``end_at`` (all its threads)."""
    import resource

    for when in (start_at, end_at):
        time.sleep(max(0.0, when - time.time()))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.append(usage.ru_utime + usage.ru_stime)


def _client_process(conn: Any, spec: ClientSpec) -> None:
    """A client process (spawned): load, choose inputs and expectations, then run what the parent asks."""
    # The parent stops us: Ctrl-C reaches the whole process group, and a traceback from every
    # client would bury the parent's one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = None
    try:
        client = _LoadClient(spec)
        conn.send(("ready", client.summary()))
        while True:
            command, payload = conn.recv()
            if command == "stop":
                break
            conn.send(("result", client.run(**payload)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone
    except Exception as e:
        with contextlib.suppress(Exception):
            conn.send(("error", f"client process {spec.index}: {type(e).__name__}: {e}"))
    finally:
        if client is not None:
            client.close()
        conn.close()


class ClientPool:
    """Client processes (spawned, never forked: this process holds onnxruntime threads)."""

    def __init__(self, processes: int, slots: int, model_root: str, model: str, seed: int,
                 own_connection: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            spec = ClientSpec(model_root=model_root, model=model, seed=seed, index=i, slots=slots,
                              send_inputs=i == 0, own_connection=own_connection)
            proc = ctx.Process(target=_client_process, args=(child, spec), name=f"bench-serve-client-{i}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def _recv(self, i: int, deadline: float) -> Any:
        conn, proc = self.conns[i], self.procs[i]
        while not conn.poll(0.2):
            if not proc.is_alive() and not conn.poll(0):
                raise BenchError(f"client process {i} exited with status {proc.exitcode}")
            if time.monotonic() > deadline:
                raise BenchError(f"client process {i} did not answer in time")
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise BenchError(f"client process {i} exited with status {proc.exitcode}") from None
        if kind == "error":
            raise BenchError(payload)
        return payload

    def wait_ready(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
        return [self._recv(i, deadline) for i in range(len(self.procs))]

    def start_run(self, target: str, concurrency: int, start_at: float, end_at: float, max_requests: int,
                  protocol: str = "grpc") -> list[int]:
        """Spread ``concurrency`` clients over the processes; returns the processes used."""
        n = min(len(self.procs), concurrency)
        used = []
        for i in range(n):
            clients = concurrency // n + (i < concurrency % n)
            cap = max(1, math.ceil(max_requests / concurrency))
            self.conns[i].send(("run", dict(target=target, clients=clients, start_at=start_at, end_at=end_at,
                                            max_requests=cap, protocol=protocol)))
            used.append(i)
        return used

    def collect(self, used: list[int], end_at: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + max(0.0, end_at - time.time()) + CALL_TIMEOUT_S + 15.0
        return [self._recv(i, deadline) for i in used]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop", None))
        for proc in self.procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
