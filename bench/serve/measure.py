"""The measuring: raw ``session.run`` and every setting, interleaved in rounds, and a setting's row."""
from __future__ import annotations

import collections
import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bench import _common as common
from bench.serve.clients import SERIES, ClientPool
from bench.serve.config import (
    ECHO,
    HOST,
    HTTP_PROTOCOLS,
    IDLE_GAP_S,
    IDLE_RAW_SHARE,
    PEER_PROTOCOLS,
    CPU_PROBE_S,
    MAX_BATCH,
    MISMATCH,
    PROG,
    RAW_MIN_CALLS,
    RAW_SHARE,
    SERVER_START_TIMEOUT_S,
    WARMUP_S,
    BenchError,
    Config,
    row,
)
from bench.serve.echo import parse_ready as parse_echo_ready
from bench.serve.servers import (
    ServerProcess,
    check_external,
    check_external_http,
    echo_command,
    server_command,
    server_label,
)


class _Shield:
    """Ignores SIGINT and SIGTERM while what was started is being stopped (each stop is bounded)."""

    def __init__(self) -> None:
        self.saved: dict[int, Any] = {}

    def ignore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.saved = {}


@dataclass
class Setting:
    batching: str  # on, off, external
    concurrency: int
    max_batch: int | None
    target: str
    server: ServerProcess | None
    workers: int = 1
    protocol: str = "grpc"  # a --protocol, or ECHO for the bare gRPC round trip
    windows_s: float = 0.0
    server_cpu_s: float | None = 0.0
    client_cpu_s: float | None = 0.0
    inference_share_s: float = 0.0
    checked: int = 0
    capped: bool = False
    errors: collections.Counter = field(default_factory=collections.Counter)
    data: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    per_round: list[dict[str, float | None]] = field(default_factory=list)  # qps, p50_ms, p99_ms of each window
    worker_connections: list[list[int] | None] = field(default_factory=list)  # each window's, with --workers

    @property
    def label(self) -> str:
        if self.protocol == ECHO:
            return f"bare gRPC echo, {self.concurrency} client{'s' if self.concurrency > 1 else ''}"
        return (f"{server_label(self.batching, self.workers)}, {self.protocol}, "
                f"{self.concurrency} client{'s' if self.concurrency > 1 else ''}")


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def measure_setting(s: Setting, pool: ClientPool, seconds: float, max_requests: int) -> None:
    """One window of ``seconds`` after ``WARMUP_S`` of untimed load; adds to ``s``."""
    start_at = time.time() + WARMUP_S
    end_at = start_at + seconds
    used = pool.start_run(s.target, s.concurrency, start_at, end_at, max_requests, s.protocol)
    cpu0 = cpu1 = None
    if s.server is not None:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = s.server.cpu_seconds()
        if s.workers > 1:  # the clients connected in the warm-up; None where /proc cannot say
            s.worker_connections.append(s.server.worker_connections(int(s.target.rpartition(":")[2])))
        time.sleep(max(0.0, end_at - time.time()))
        cpu1 = s.server.cpu_seconds()
    results = pool.collect(used, end_at)
    capped = any(r["capped"] for r in results)
    window = (min(end_at, max(r["last_done"] for r in results)) if capped else end_at) - start_at
    s.windows_s += max(window, 0.0)
    s.capped |= capped
    s.server_cpu_s = _add(s.server_cpu_s, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
    s.client_cpu_s = _add(s.client_cpu_s, sum(r["cpu_s"] for r in results) if all(r["cpu_s"] is not None
                                                                                   for r in results) else None)
    latency = [v for r in results for v in r["latency_ms"]]
    s.per_round.append(dict(qps=len(latency) / window if window > 0 else None, p50_ms=pct(latency, 50),
                            p99_ms=pct(latency, 99)))
    for r in results:
        s.errors.update(r["errors"])
        s.checked += r["checked"]
        s.inference_share_s += r["inference_share_s"]
        for k in SERIES:
            s.data[k] += r[k]


def measure_raw(run: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray], seconds: float,
                samples: common.Samples, idle_s: float = 0.0) -> None:
    """session.run at batch 1 on ``inputs`` in turn for ``seconds`` (at least RAW_MIN_CALLS calls),
    each call after ``idle_s`` seconds of sleep (untimed), as a served model waits between calls."""
    stop = time.perf_counter() + seconds
    n = 0
    while n < RAW_MIN_CALLS or time.perf_counter() < stop:
        x = inputs[n % len(inputs)][None]
        if idle_s:
            time.sleep(idle_s)
        common.time_call(lambda: run(x), samples)
        n += 1


def model_cpu_per_row(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batches: Sequence[int],
                      seconds: float = CPU_PROBE_S, cpu_clock: Callable[[], float] = time.process_time,
                      ) -> dict[int, float]:
    """CPU ms per row of ``run`` (session.run) at each batch size: copies of ``x`` run for
    ``seconds`` (at least 3 calls), this process's CPU time (onnxruntime's threads are in it) over
    the rows. When the cores are the limit, a row's CPU batched against alone is all that batching
    can gain; onnxruntime's intra-op threads cost CPU of their own at batch 1."""
    out = {}
    for b in batches:
        xb = np.ascontiguousarray(np.repeat(x[None], b, axis=0))
        run(xb)  # untimed: onnxruntime's first call at this shape
        calls, start, began = 0, cpu_clock(), time.perf_counter()
        while calls < 3 or time.perf_counter() - began < seconds:
            run(xb)
            calls += 1
        out[b] = (cpu_clock() - start) * 1e3 / (calls * b)
    return out


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def setting_row(s: Setting, cfg: Config, raw_p50: float | None, processes: int) -> dict[str, Any]:
    d = s.data
    lat = d["latency_ms"]
    p50 = pct(lat, 50)
    errors = sum(s.errors.values())
    echo = s.protocol == ECHO
    return row(kind="echo" if echo else "served", model=cfg.model, batching=None if echo else s.batching,
               max_batch=None if echo else s.max_batch, workers=s.workers, protocol=s.protocol,
               concurrency=s.concurrency, tail_ratio=ratio(pct(lat, 99), p50),
               client_processes=min(processes, s.concurrency), threads=cfg.threads if s.server else None,
               rounds=cfg.rounds, window_s=s.windows_s, requests=len(lat), checked=s.checked,
               qps=len(lat) / s.windows_s if s.windows_s else None, p50_ms=p50, p95_ms=pct(lat, 95),
               p99_ms=pct(lat, 99), mean_ms=float(np.mean(lat)) if lat else None, errors=errors,
               errors_by_code=dict(sorted(s.errors.items())), mismatches=s.errors.get(MISMATCH, 0),
               mean_batch=float(np.mean(d["batch"])) if d["batch"] else None, raw_p50_ms=raw_p50,
               overhead=ratio(p50, raw_p50) if s.concurrency == 1 and not echo else None,
               server_total_p50_ms=pct(d["server_total_ms"], 50), server_queue_p50_ms=pct(d["server_queue_ms"], 50),
               server_inference_p50_ms=pct(d["server_inference_ms"], 50),
               server_other_p50_ms=pct(d["server_other_ms"], 50), transport_p50_ms=pct(d["transport_ms"], 50),
               serving_cost_p50_ms=pct(d["serving_cost_ms"], 50),
               # Answers that end in the window may have started their batch before it: capped at 1.
               inference_busy=min(1.0, s.inference_share_s / s.windows_s) if s.windows_s and d["batch"] else None,
               server_cpu=s.server_cpu_s / s.windows_s if s.server_cpu_s is not None and s.windows_s else None,
               client_cpu=s.client_cpu_s / s.windows_s if s.client_cpu_s is not None and s.windows_s else None,
               worker_connections=s.worker_connections or None,
               note="request bound reached: window shortened" if s.capped else None)


def _log(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def measure(cfg: Config, root: str, model: Any
            ) -> tuple[list[Setting], common.Samples, common.Samples, int, dict[int, float]]:
    """Start the servers and clients, measure raw and every setting in rounds, stop everything.
    Returns the settings, raw session.run in a tight loop and after IDLE_GAP_S idle before each
    call, the client processes, and the model's CPU ms per row at batch 1 and at the largest batch
    a server here runs (:func:`model_cpu_per_row`, measured before the rounds, every server idle)."""
    max_c = max(cfg.concurrency)
    processes = min(cfg.client_processes, max_c)
    round_s = cfg.duration_s / cfg.rounds
    with contextlib.ExitStack() as stack:
        shield = _Shield()
        stack.callback(shield.restore)  # last out
        servers: dict[tuple[str, int], ServerProcess] = {}
        echo_server = ServerProcess("bare gRPC echo", echo_command(), parse=parse_echo_ready)
        stack.callback(echo_server.stop)
        if cfg.server is None:
            for b in cfg.batching:  # all started at once: their model loads overlap
                for w in cfg.workers:
                    servers[b, w] = ServerProcess(server_label(b, w), server_command(cfg, root, MAX_BATCH[b], w), w)
                    stack.callback(servers[b, w].stop)
        peer = None
        if cfg.peer is not None:  # started with the servers: the model loads overlap
            from bench.serve.peer import default_python, start_kserve

            peer = start_kserve(cfg.peer_python or default_python(), model.path, cfg.model, cfg.threads,
                                label=f"{cfg.peer} peer", spinning=cfg.spinning)
            stack.callback(peer.stop)
        pool = ClientPool(processes, math.ceil(max_c / processes), root, cfg.model, cfg.seed,
                          own_connection=max(cfg.workers) > 1)
        stack.callback(pool.close)
        stack.callback(shield.ignore)  # first out: Ctrl-C cannot cut the stops short
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        targets = {key: f"{HOST}:{s.wait_ready(deadline)}" for key, s in servers.items()}
        http_targets = {key: f"{HOST}:{s.http_port}" for key, s in servers.items() if s.http_port is not None}
        echo_target = f"{HOST}:{echo_server.wait_ready(deadline)}"
        summaries = pool.wait_ready()
        first_inputs = summaries[0]["first_inputs"]
        max_batches: dict[str, int | None] = {b: MAX_BATCH.get(b) for b in cfg.batching}
        if cfg.server is not None:
            max_batches["external"] = check_external(cfg, model, first_inputs[0])
            targets["external", 1] = cfg.server
            if cfg.http_server is not None:
                check_external_http(cfg)
                http_targets["external", 1] = cfg.http_server
        for key in targets:
            if set(cfg.protocols) & set(HTTP_PROTOCOLS) and key not in http_targets:
                raise BenchError(f"server ({server_label(*key)}) did not name an HTTP address in its ready line")
        settings = [Setting(b, c, max_batches[b], http_targets[b, w] if p in HTTP_PROTOCOLS else targets[b, w],
                            servers.get((b, w)), workers=w, protocol=p)
                    for b in cfg.batching for w in cfg.workers for p in cfg.protocols for c in cfg.concurrency]
        if peer is not None:
            settings += _peer_settings(cfg, peer, deadline)
        # The bare round trip, in the rounds like every setting: its p50 is what any gRPC answer costs here.
        settings.append(Setting("-", 1, None, echo_target, echo_server, protocol=ECHO))
        if peer is not None and max_c > 1:  # under load too: its CPU per call is the floor of any gRPC server here
            settings.append(Setting("-", max_c, None, echo_target, echo_server, protocol=ECHO))
        _log(f"{cfg.model} {'x'.join(map(str, model.input_size))} from {model.path}; "
             + ", ".join(f"{server_label(b, w)} at {t}" + (f" (http {http_targets[b, w]})"
                                                             if (b, w) in http_targets else "")
                         for (b, w), t in targets.items()) + f"; bare gRPC echo at {echo_target}"
             + f"; {processes} client processes with {', '.join(str(s['inputs']) for s in summaries)} inputs in "
             f"{', '.join(str(s['classes']) for s in summaries)} classes; {cfg.rounds} rounds of {round_s:g} s")
        raw, raw_idle = common.Samples(), common.Samples()
        for _ in range(2):  # untimed: onnxruntime's first calls on this shape
            model.run(first_inputs[0][None])
        cpu_per_row = model_cpu_per_row(model.run, first_inputs[0],
                                        sorted({1, *(b for b in max_batches.values() if b)}),
                                        min(CPU_PROBE_S, round_s * RAW_SHARE))
        for r in range(cfg.rounds):
            measure_raw(model.run, first_inputs, round_s * RAW_SHARE, raw)
            measure_raw(model.run, first_inputs, round_s * IDLE_RAW_SHARE, raw_idle, idle_s=IDLE_GAP_S)
            k = r % len(settings)
            order = settings[k:] + settings[:k]
            if r % 2:
                order.reverse()
            for s in order:
                before = len(s.data["latency_ms"])
                measure_setting(s, pool, round_s, math.ceil(cfg.max_requests / cfg.rounds))
                _log(f"round {r + 1}/{cfg.rounds}: {s.label}: {len(s.data['latency_ms']) - before} answers, "
                     f"{sum(s.errors.values())} errors so far")
    return settings, raw, raw_idle, processes, cpu_per_row


def add_echo_gaps(rows: list[dict[str, Any]], raw_idle_p50: float | None = None) -> None:
    """Each one-client served row's gap: served p50 - (echo p50 + raw p50), what serving costs beyond
    a bare gRPC round trip and the inference itself; with ``raw_idle_p50`` (session.run after
    IDLE_GAP_S idle) kept beside it, for the share of the gap that is the idle model's."""
    echo = next((r for r in rows if r["kind"] == "echo" and r["concurrency"] == 1), None)
    if echo is None or echo["p50_ms"] is None:
        return
    for r in rows:
        if r["kind"] == "served" and r["concurrency"] == 1 and r["p50_ms"] is not None and r["raw_p50_ms"]:
            r["echo_p50_ms"] = echo["p50_ms"]
            r["echo_gap_ms"] = r["p50_ms"] - (echo["p50_ms"] + r["raw_p50_ms"])
            r["raw_idle_p50_ms"] = raw_idle_p50


def _peer_settings(cfg: Config, peer: Any, deadline: float) -> list[Setting]:
    """The ``--peer`` server's settings: every Open Inference Protocol protocol of the run at
    every concurrency, driven by the same clients as the servers' own settings."""
    grpc_target = f"{HOST}:{peer.wait_ready(deadline)}"
    http_target = f"{HOST}:{peer.http_port}"
    _log(f"{peer.label} at {grpc_target} (http {http_target})")
    assert cfg.peer is not None
    return [Setting(cfg.peer, c, None, http_target if p in HTTP_PROTOCOLS else grpc_target, peer, protocol=p)
            for p in cfg.protocols if p in PEER_PROTOCOLS for c in cfg.concurrency]
