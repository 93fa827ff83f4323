"""Load test of ``python -m serve``: throughput, tail latency, dynamic batching and serving overhead.

    python -m bench.serve [--model NAME] [--model-dir DIR] [--server HOST:PORT] [--concurrency 1,4,16,64]
                          [--duration S] [--batching on,off] [--workers 1,2] [--json PATH] [--quick]

Unless ``--server`` names one, starts its own servers on 127.0.0.1 (``python -m serve --port 0``
with ``--max-batch 16`` for batching on and ``--max-batch 1`` for off, each with every
``--workers`` count; all at once, idle while another is measured) and stops them when done, on
Ctrl-C, SIGTERM or an error (SIGTERM, wait, kill). A server of W workers gets ``--threads``/W
onnxruntime threads per worker (at least 1), so with ``--threads`` a multiple of W every server
has the same threads in all; with a W > 1 in
the run every client opens a connection of its own (the kernel spreads connections, not calls,
over the workers), in every setting of the run alike.

The load comes from closed-loop clients: each is a thread with its own
:class:`serve.client.Classifier` that sends its next request when the last one is answered; the
clients of a setting are spread over several processes (multiprocessing, so no client process's
GIL is the bottleneck), and every call has a deadline, every setting a time and a request bound.

Every answer must match its own input: each client sends its own distinct tensors and checks the
top class of every answer, and its score, against what onnxruntime computed for that input in
the client process before any timing; a wrong answer counts as a ``MISMATCH`` error.

Per setting (batching x concurrency): QPS, client-observed p50/p95/p99, errors by status code
(warm-up requests included: every answer is checked), mean batch size (from the responses), the
server's own split of a request's time (batch queue, inference, the rest) and what is left for
gRPC and the client, how busy the model was, and the CPU used by the server and by the clients.
Raw onnxruntime ``session.run`` at batch 1 on the same inputs, in this process with the server's
thread count, is measured in the same run: served p50 at one client over raw p50 is the cost of
serving. Raw and every setting are interleaved in rounds (order rotating), because this
machine's timings drift by up to 1.7x within minutes (docs/benchmarking.md). Nothing is asserted: the
targets are reported, each with what bounds it.

Exit status: 0 when every request was answered correctly, 1 when any failed or mismatched (the
table is printed either way) or the benchmark could not run (one line), 2 for bad options.
Models are exported once with random weights (``python -m export.onnx`` in a subprocess: torch
is never loaded here) into ``--cache``, or read from ``--model-dir``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from bench import _common as common
from contract.cli import HelpFormatter
from serve.ready import parse_ready_line
from zoo.fileio import atomic_write

PROG = "python -m bench.serve"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every default in one place.
DEFAULT_MODEL = "resnext_mini"
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_DURATION_S = 10.0  # measured seconds per setting, over all rounds
DEFAULT_BATCHING = ("on", "off")
DEFAULT_WORKERS = (1,)
QUICK_CONCURRENCY, QUICK_DURATION_S = (1, 4), 2.0
DEFAULT_CACHE = os.path.join("runs", "bench", "models")  # bench.latency's cache: same layout, shared
MAX_BATCH = {"on": 16, "off": 1}  # python -m serve --max-batch
HOST = "127.0.0.1"
# A setting's --duration is split into rounds of at least ROUND_MIN_S, at most MAX_ROUNDS of them.
ROUND_MIN_S, MAX_ROUNDS = 2.0, 4
# Each setting's clients run this long untimed before its window (connections, server threads,
# onnxruntime's buffers for the batch sizes this load produces).
WARMUP_S = 0.5
# Raw session.run gets this share of a round's length per round, and at least RAW_MIN_CALLS calls.
RAW_SHARE, RAW_MIN_CALLS = 1.0, 5
# Inputs: flat per-channel colours plus noise. A random-init net sends white noise to one class
# (resnext_mini: 64 of 64 noise inputs in class 766); flat colours reach several classes, so an
# answer meant for another input usually shows in the class, and otherwise in the score.
INPUTS_PER_CLIENT = 3  # distinct tensors per client, sent in turn
CANDIDATES_PER_INPUT = 2  # candidates drawn per input kept (the ones with a clear top class, spread over classes)
COLOR_SCALE, NOISE_SCALE = 3.0, 0.5
# A kept input's top class beats the second by this fraction of its largest |logit|, so batch
# size and thread count (which change onnxruntime's summation order) cannot flip it.
MIN_MARGIN = 1e-3
SCORE_RTOL = 1e-4  # an answer's score against the expected probability (scores differ by ~1e-2 between inputs)
TOP_K = 1
CALL_TIMEOUT_S = 30.0  # every call's deadline
MAX_REQUESTS = 100_000  # per setting, over all rounds and clients (--max-requests)
SERVER_START_TIMEOUT_S = 300.0  # loading resnext50 on a busy machine takes seconds, not minutes
SERVER_GRACE_S = 2.0  # python -m serve --grace
# After SIGTERM, beyond the grace, before SIGKILL; longer than a --workers parent waits for a
# stuck worker (serve.__main__.WORKER_KILL_AFTER_S), so the parent gets to kill it.
KILL_AFTER_S = 45.0
CLIENT_START_TIMEOUT_S = 600.0  # client processes load the model and compute their expectations
EXPORT_TIMEOUT_S = 1800.0
# The targets, reported and never asserted.
TARGET_CONCURRENCY = 16
BATCHING_GAIN_TARGET = 1.3  # QPS batching on / off at TARGET_CONCURRENCY clients
P99_OVER_LONE_TARGET = 2.0  # p99 with batching at TARGET_CONCURRENCY / p50 of one client
OVERHEAD_TARGET = 1.10  # served p50 at one client / raw session.run p50
MISMATCH = "MISMATCH"  # the error code of a wrong answer

# Every JSON row has every key (None where it does not apply), so the rows load as one table.
ROW_KEYS = (
    "kind", "model", "batching", "max_batch", "workers", "concurrency", "client_processes", "threads", "rounds",
    "window_s", "requests", "checked", "qps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "errors",
    "errors_by_code", "mismatches", "mean_batch", "raw_p50_ms", "overhead", "server_total_p50_ms",
    "server_queue_p50_ms", "server_inference_p50_ms", "server_other_p50_ms", "transport_p50_ms",
    "serving_cost_p50_ms", "inference_busy", "server_cpu", "client_cpu", "target", "value", "threshold", "met", "note",
)


class BenchError(Exception):
    """The benchmark cannot run: one line, exit 1."""


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that everything started is stopped on the way out."""


def row(**kw: Any) -> dict[str, Any]:
    unknown = set(kw) - set(ROW_KEYS)
    assert not unknown, unknown
    return {k: kw.get(k) for k in ROW_KEYS}


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    w = p.add_argument_group("what to serve")
    w.add_argument("--model", default=None, help=f"model name (default {DEFAULT_MODEL})")
    w.add_argument("--model-dir", metavar="DIR", default=None,
                   help="model repository holding NAME/VERSION/model.onnx (default: export NAME with random "
                        "weights into --cache)")
    w.add_argument("--cache", default=DEFAULT_CACHE, help="where random-weight exports are kept and reused")
    w.add_argument("--server", metavar="HOST:PORT", default=None,
                   help="load this running server instead of starting two; it must serve the model that "
                        "--model-dir (or --cache) holds, or every answer mismatches")
    w.add_argument("--threads", type=int, default=cores,
                   help="onnxruntime intra-op threads of the servers started and of the raw session.run")
    m = p.add_argument_group("load")
    m.add_argument("--concurrency", type=common.csv_list(int), default=None,
                   help=f"closed-loop clients, comma-separated (default {','.join(map(str, DEFAULT_CONCURRENCY))})")
    m.add_argument("--duration", type=float, default=None,
                   help=f"measured seconds per setting, over all rounds (default {DEFAULT_DURATION_S:g})")
    m.add_argument("--batching", type=common.csv_list(str), default=None,
                   help=f"on (--max-batch {MAX_BATCH['on']}), off (--max-batch {MAX_BATCH['off']}) or both "
                        f"(default {','.join(DEFAULT_BATCHING)}); not with --server")
    m.add_argument("--workers", type=common.csv_list(int), default=None,
                   help="python -m serve --workers of the servers started, comma-separated (default 1); "
                        "not with --server")
    m.add_argument("--client-processes", type=int, default=cores,
                   help="processes the clients are spread over (at most one per client)")
    m.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds (default: one per {ROUND_MIN_S:g} s of --duration, at most {MAX_ROUNDS})")
    m.add_argument("--max-requests", type=int, default=MAX_REQUESTS, help="measured requests per setting at most")
    m.add_argument("--seed", type=int, default=0, help="seed of the clients' inputs")
    m.add_argument("--quick", action="store_true",
                   help=f"{DEFAULT_MODEL}, concurrency {','.join(map(str, QUICK_CONCURRENCY))}, "
                        f"{QUICK_DURATION_S:g} s each (a smoke run: the targets at {TARGET_CONCURRENCY} clients are "
                        "not measured); explicit options still win")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="every row (settings, raw, targets) as a JSON list")
    return p


@dataclass
class Config:
    model: str
    model_dir: str | None
    cache: str
    server: str | None
    threads: int
    concurrency: list[int]
    duration_s: float
    batching: list[str]  # ["external"] with --server
    workers: list[int]  # [1] with --server (whatever it runs counts as one server)
    client_processes: int
    rounds: int
    max_requests: int
    seed: int
    json_path: str | None


def resolve_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """Validate everything before any work; a bad value is one parser error."""
    from contract.repository import NAME_RE

    model = args.model or DEFAULT_MODEL
    if not NAME_RE.fullmatch(model):
        parser.error(f"--model: invalid name {model!r}")
    if args.model_dir is not None and not os.path.isdir(os.path.join(args.model_dir, model)):
        parser.error(f"--model-dir {args.model_dir}: no directory {os.path.join(args.model_dir, model)}")
    if os.path.exists(args.cache) and not os.path.isdir(args.cache):
        parser.error(f"--cache {args.cache}: exists and is not a directory")
    concurrency = list(dict.fromkeys(args.concurrency or (QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY)))
    if any(c < 1 for c in concurrency):
        parser.error(f"--concurrency: at least 1 client, got {','.join(map(str, concurrency))}")
    duration = args.duration if args.duration is not None else (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    if not duration > 0:
        parser.error(f"Invalid --duration: {duration} (more than 0)")
    if args.server is not None:
        if args.batching is not None:
            parser.error("--batching: applies to the servers this tool starts; --server batches as it was started")
        host, sep, port = args.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error(f"--server {args.server!r}: expected HOST:PORT")
        if args.workers is not None:
            parser.error("--workers: applies to the servers this tool starts")
        batching = ["external"]
    else:
        batching = list(dict.fromkeys(b.lower() for b in (args.batching or DEFAULT_BATCHING)))
        bad = [b for b in batching if b not in MAX_BATCH]
        if bad:
            parser.error(f"--batching: unknown {', '.join(bad)}; choose from {', '.join(MAX_BATCH)}")
    workers = list(dict.fromkeys(args.workers or DEFAULT_WORKERS))
    if any(w < 1 for w in workers):
        parser.error(f"--workers: at least 1, got {','.join(map(str, workers))}")
    for flag, value in (("--threads", args.threads), ("--client-processes", args.client_processes),
                        ("--max-requests", args.max_requests)):
        if value < 1:
            parser.error(f"Invalid {flag}: {value} (at least 1)")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"Invalid --rounds: {args.rounds} (at least 1)")
    rounds = args.rounds or max(1, min(MAX_ROUNDS, int(duration // ROUND_MIN_S)))
    if args.json:
        probe = os.path.dirname(os.path.abspath(args.json))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if os.path.isdir(args.json) or not os.path.isdir(probe) or not os.access(probe, os.W_OK):
            parser.error(f"--json {args.json}: not a writable file path")
    return Config(model=model, model_dir=args.model_dir, cache=args.cache, server=args.server, threads=args.threads,
                  concurrency=concurrency, duration_s=duration, batching=batching, workers=workers,
                  client_processes=args.client_processes, rounds=rounds, max_requests=args.max_requests,
                  seed=args.seed, json_path=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = resolve_config(parser, args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(cfg)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


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


# --------------------------------------------------------------------------- the model


def ensure_model(cfg: Config) -> str:
    """The repository root holding ``cfg.model``: ``--model-dir``, or ``--cache`` after exporting it there."""
    if cfg.model_dir is not None:
        return os.path.abspath(cfg.model_dir)
    root = os.path.abspath(cfg.cache)
    target = os.path.join(root, cfg.model)
    if os.path.isfile(os.path.join(target, "1", "model.onnx")):
        return root
    os.makedirs(root, exist_ok=True)
    # Export next to the cache, then move into place: a concurrent run (or bench.latency, which
    # shares the cache) never reads a half-written model.
    tmp = tempfile.mkdtemp(prefix=f".export-{cfg.model}-", dir=root)
    try:
        print(f"{PROG}: exporting {cfg.model} (random weights) into {root}", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "export.onnx", cfg.model, "--out", tmp, "--name", cfg.model, "--version", "1",
                   "--latency-runs", "0", "--no-progress", "--threads", str(cfg.threads)]
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=EXPORT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"export of {cfg.model} took over {EXPORT_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            raise BenchError(f"export of {cfg.model} failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no message'}")
        os.makedirs(target, exist_ok=True)
        for entry in os.listdir(os.path.join(tmp, cfg.model)):
            with contextlib.suppress(OSError):  # already there: another run exported it meanwhile
                if not os.path.exists(os.path.join(target, entry)):
                    os.rename(os.path.join(tmp, cfg.model, entry), os.path.join(target, entry))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, in float64: the server's softmax (serve.server._softmax) on every row."""
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
    probs = _softmax(logits)
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


# --------------------------------------------------------------------------- client processes


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

    def _classifiers(self, target: str, n: int) -> list[Any]:
        """``n`` clients of ``target``, kept for the next run. The channels of one process share one
        HTTP/2 connection (gRPC's global subchannel pool), as clients in one process would, unless
        ``own_connection``."""
        from serve.client import Classifier

        clients = self.clients.setdefault(target, [])
        while len(clients) < n:
            clients.append(Classifier(target, timeout=CALL_TIMEOUT_S, own_connection=self.spec.own_connection))
        return clients[:n]

    def run(self, target: str, clients: int, start_at: float, end_at: float, max_requests: int) -> dict[str, Any]:
        """``clients`` closed-loop threads until ``end_at``; what they saw between ``start_at`` and ``end_at``."""
        classifiers = self._classifiers(target, clients)
        records = [_Records() for _ in range(clients)]
        cpu: list[float] = []
        threads = [threading.Thread(target=self._drive, args=(classifiers[t], t, start_at, end_at, max_requests,
                                                              records[t]), name=f"client-{t}", daemon=True)
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
               rec: _Records) -> None:
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
                r = client.classify(x, model=self.model, top_k=TOP_K, timeout=CALL_TIMEOUT_S)
            except ClientError as e:
                r, code = None, e.code.name
            except Exception as e:  # not a status: still one failed request, and the loop goes on
                r, code = None, type(e).__name__
            latency = time.perf_counter() - t0
            done = time.time()
            rec.checked += 1
            if r is not None:
                top = r.classes[0] if r.classes else None
                ok = (top is not None and top.index == want_class
                      and abs(top.score - want_score) <= SCORE_RTOL * want_score)
                code = None if ok else MISMATCH
            if code is not None:
                rec.errors[code] += 1
            if not start_at <= done < end_at or code is not None:
                continue
            measured += 1
            rec.last_done = done
            t = r.timing  # microseconds, measured by the server
            rec.latency_ms.append(latency * 1e3)
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

    def start_run(self, target: str, concurrency: int, start_at: float, end_at: float, max_requests: int) -> list[int]:
        """Spread ``concurrency`` clients over the processes; returns the processes used."""
        n = min(len(self.procs), concurrency)
        used = []
        for i in range(n):
            clients = concurrency // n + (i < concurrency % n)
            cap = max(1, math.ceil(max_requests / concurrency))
            self.conns[i].send(("run", dict(target=target, clients=clients, start_at=start_at, end_at=end_at,
                                            max_requests=cap)))
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


# --------------------------------------------------------------------------- server processes


class ServerProcess:
    """``python -m serve ...`` in a subprocess: its ready line, CPU time and a bounded stop."""

    def __init__(self, label: str, command: list[str], workers: int = 1) -> None:
        from serve.__main__ import PARENT_ENV

        self.label, self.workers = label, workers
        # With PARENT_ENV the server stops by itself if this process dies without stopping it.
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.port: int | None = None
        self._ready = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True, name=f"server-{label}-output")
                         for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:  # drained to the end, so the server never blocks on a full pipe
            self.lines.append(line.rstrip("\n"))
            ready = parse_ready_line(line)
            if ready is not None and not self._ready.is_set():
                self.port = ready.port
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
        """User + system CPU seconds so far of the server process and its children (the
        ``--workers`` processes), from Linux /proc; None where that cannot be read."""
        try:
            pids = [self.proc.pid] + (_children(self.proc.pid) if self.workers > 1 else [])
            total = 0
            for pid in pids:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])
            return total / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """SIGTERM, wait for its graceful stop, SIGKILL after ``KILL_AFTER_S`` more."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_GRACE_S + KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                print(f"{PROG}: server ({self.label}, pid {self.proc.pid}) did not stop: killed",
                      file=sys.stderr, flush=True)
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(2.0)


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


def server_command(cfg: Config, root: str, max_batch: int, workers: int = 1) -> list[str]:
    from serve.server import DEFAULT_MAX_CONCURRENCY

    # --drain-delay 0: the load has stopped before a server is stopped; nothing is left to drain.
    return [sys.executable, "-m", "serve", "--model-dir", root, "--model", cfg.model, "--host", HOST, "--port", "0",
            "--providers", "cpu", "--threads", str(max(1, cfg.threads // workers)), "--max-batch", str(max_batch),
            "--max-concurrency", str(max(DEFAULT_MAX_CONCURRENCY, max(cfg.concurrency))),
            "--grace", str(SERVER_GRACE_S), "--drain-delay", "0", "--workers", str(workers)]


def server_label(batching: str, workers: int) -> str:
    return f"batching {batching}" + (f", {workers} workers" if workers > 1 else "")


# --------------------------------------------------------------------------- measuring


@dataclass
class Setting:
    batching: str  # on, off, external
    concurrency: int
    max_batch: int | None
    target: str
    server: ServerProcess | None
    workers: int = 1
    windows_s: float = 0.0
    server_cpu_s: float | None = 0.0
    client_cpu_s: float | None = 0.0
    inference_share_s: float = 0.0
    checked: int = 0
    capped: bool = False
    errors: collections.Counter = field(default_factory=collections.Counter)
    data: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    @property
    def label(self) -> str:
        return (f"{server_label(self.batching, self.workers)}, "
                f"{self.concurrency} client{'s' if self.concurrency > 1 else ''}")


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def measure_setting(s: Setting, pool: ClientPool, seconds: float, max_requests: int) -> None:
    """One window of ``seconds`` after ``WARMUP_S`` of untimed load; adds to ``s``."""
    start_at = time.time() + WARMUP_S
    end_at = start_at + seconds
    used = pool.start_run(s.target, s.concurrency, start_at, end_at, max_requests)
    cpu0 = cpu1 = None
    if s.server is not None:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = s.server.cpu_seconds()
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
    for r in results:
        s.errors.update(r["errors"])
        s.checked += r["checked"]
        s.inference_share_s += r["inference_share_s"]
        for k in SERIES:
            s.data[k] += r[k]


def measure_raw(run: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray], seconds: float,
                samples: common.Samples) -> None:
    """session.run at batch 1 on ``inputs`` in turn for ``seconds`` (at least RAW_MIN_CALLS calls)."""
    stop = time.perf_counter() + seconds
    n = 0
    while n < RAW_MIN_CALLS or time.perf_counter() < stop:
        x = inputs[n % len(inputs)][None]
        common.time_call(lambda: run(x), samples)
        n += 1


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def setting_row(s: Setting, cfg: Config, raw_p50: float | None, processes: int) -> dict[str, Any]:
    d = s.data
    lat = d["latency_ms"]
    p50 = _pct(lat, 50)
    errors = sum(s.errors.values())
    return row(kind="served", model=cfg.model, batching=s.batching, max_batch=s.max_batch, workers=s.workers,
               concurrency=s.concurrency,
               client_processes=min(processes, s.concurrency), threads=cfg.threads if s.server else None,
               rounds=cfg.rounds, window_s=s.windows_s, requests=len(lat), checked=s.checked,
               qps=len(lat) / s.windows_s if s.windows_s else None, p50_ms=p50, p95_ms=_pct(lat, 95),
               p99_ms=_pct(lat, 99), mean_ms=float(np.mean(lat)) if lat else None, errors=errors,
               errors_by_code=dict(sorted(s.errors.items())), mismatches=s.errors.get(MISMATCH, 0),
               mean_batch=float(np.mean(d["batch"])) if d["batch"] else None, raw_p50_ms=raw_p50,
               overhead=_ratio(p50, raw_p50) if s.concurrency == 1 else None,
               server_total_p50_ms=_pct(d["server_total_ms"], 50), server_queue_p50_ms=_pct(d["server_queue_ms"], 50),
               server_inference_p50_ms=_pct(d["server_inference_ms"], 50),
               server_other_p50_ms=_pct(d["server_other_ms"], 50), transport_p50_ms=_pct(d["transport_ms"], 50),
               serving_cost_p50_ms=_pct(d["serving_cost_ms"], 50),
               # Answers that end in the window may have started their batch before it: capped at 1.
               inference_busy=min(1.0, s.inference_share_s / s.windows_s) if s.windows_s else None,
               server_cpu=s.server_cpu_s / s.windows_s if s.server_cpu_s is not None and s.windows_s else None,
               client_cpu=s.client_cpu_s / s.windows_s if s.client_cpu_s is not None and s.windows_s else None,
               note="request bound reached: window shortened" if s.capped else None)


# --------------------------------------------------------------------------- targets


def _find(rows: list[dict[str, Any]], batching: str, concurrency: int, workers: int = 1) -> dict[str, Any] | None:
    return next((r for r in rows if r["batching"] == batching and r["concurrency"] == concurrency
                 and r["workers"] == workers), None)


def _cpu_text(r: dict[str, Any], cores: int) -> str:
    if r["server_cpu"] is None or r["client_cpu"] is None:
        return ""
    return (f"; CPU {r['server_cpu'] + r['client_cpu']:.1f} of {cores} cores busy (server {r['server_cpu']:.2f}, "
            f"clients {r['client_cpu']:.2f})")


def evaluate_targets(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """One row per target that this run measured: value, threshold, met, and what bounds it."""
    cores = os.cpu_count() or 1
    out = []
    on, off = _find(rows, "on", TARGET_CONCURRENCY), _find(rows, "off", TARGET_CONCURRENCY)
    if on and off and on["qps"] and off["qps"]:
        gain = on["qps"] / off["qps"]
        busy = off["inference_busy"] or 0.0
        # Batching shrinks only the inference part of the work (Amdahl): with batch-1 inference
        # busy a fraction f of the time, and a batch costing r times its requests run alone, the
        # gain is about 1 / (1 - f (1 - r)).
        cost = _ratio(_ratio(on["server_inference_p50_ms"], on["mean_batch"]), off["server_inference_p50_ms"])
        amdahl = 1 / (1 - busy * (1 - cost)) if cost is not None and busy * (1 - cost) < 1 else None
        note = (f"QPS {on['qps']:.0f} on vs {off['qps']:.0f} off; mean batch {on['mean_batch']:.1f} of "
                f"{on['max_batch']}; batch-1 inference busy {busy:.0%} of the time with batching off"
                + (f", and a batch costs {cost:.2f}x its requests run alone (Amdahl: batching gains ~{amdahl:.2f}x)"
                   if amdahl else "") + _cpu_text(on, cores))
        out.append(row(kind="target", model=cfg.model, target=f"batching QPS gain at {TARGET_CONCURRENCY} clients",
                       concurrency=TARGET_CONCURRENCY, value=gain, threshold=BATCHING_GAIN_TARGET,
                       met=gain >= BATCHING_GAIN_TARGET, note=note))
    lone = _find(rows, "on", 1)
    if on and lone and on["p99_ms"] and lone["p50_ms"] and on["qps"]:
        value = on["p99_ms"] / lone["p50_ms"]
        c = on["concurrency"]
        need = c / (P99_OVER_LONE_TARGET * lone["p50_ms"] / 1e3)
        per_item = _ratio(on["server_inference_p50_ms"], on["mean_batch"])
        capacity = (f"; inference alone ({per_item:.2f} ms a request) serves at most {1e3 / per_item:.0f} QPS"
                    if per_item else "")
        note = (f"p99 {on['p99_ms']:.2f} ms vs lone p50 {lone['p50_ms']:.2f} ms; Little's law: {c} closed-loop clients "
                f"at {on['qps']:.0f} QPS wait {c / on['qps'] * 1e3:.2f} ms on average, so p99 <= "
                f"{P99_OVER_LONE_TARGET:g}x lone needs over {need:.0f} QPS ({need / lone['qps']:.1f}x one client's "
                f"{lone['qps']:.0f}); server queue p50 {on['server_queue_p50_ms']:.2f} ms, inference p50 "
                f"{on['server_inference_p50_ms']:.2f} ms at mean batch {on['mean_batch']:.1f}" + capacity
                + _cpu_text(on, cores))
        out.append(row(kind="target", model=cfg.model, target=f"p99 with batching at {c} clients / lone p50",
                       concurrency=c, batching="on", value=value, threshold=P99_OVER_LONE_TARGET,
                       met=value <= P99_OVER_LONE_TARGET, note=note))
    for r in rows:
        # Raw session.run has all --threads; a worker of several has a share, so only one-worker servers.
        if r["concurrency"] != 1 or r["overhead"] is None or r["workers"] != 1:
            continue
        # Served and raw inference are timed apart, so on a noisy machine their ratio carries the
        # noise of both; latency minus the request's own inference (serving cost) does not.
        cost, raw = r["serving_cost_p50_ms"], r["raw_p50_ms"]
        parts = (f"served p50 {r['p50_ms']:.2f} ms vs raw {raw:.2f} ms; p50 of its parts: server inference "
                 f"{r['server_inference_p50_ms']:.2f}, batch queue {r['server_queue_p50_ms']:.2f}, server decode and "
                 f"reply {r['server_other_p50_ms']:.2f}, gRPC transport and client {r['transport_p50_ms']:.2f} ms; "
                 f"serving adds {cost:.2f} ms (p50 of latency minus its own inference), (raw + that) / raw = "
                 f"{(raw + cost) / raw:.2f}x")
        name = f"served p50 / raw session.run p50 ({server_label(r['batching'], r['workers'])})"
        out.append(row(kind="target", model=cfg.model, target=name, concurrency=1, batching=r["batching"],
                       workers=r["workers"],
                       value=r["overhead"], threshold=OVERHEAD_TARGET, met=r["overhead"] <= OVERHEAD_TARGET,
                       note=parts))
    return out


def unmeasured_targets(cfg: Config) -> list[str]:
    """The targets this run's settings cannot measure, each with what it needs (a --quick run
    has no 16-client setting: without this line two of the three targets would just be absent)."""
    if cfg.server:
        return []
    have = set(cfg.concurrency)
    missing = []
    if TARGET_CONCURRENCY not in have or not {"on", "off"} <= set(cfg.batching):
        missing.append(f"batching QPS gain at {TARGET_CONCURRENCY} clients: needs --concurrency with "
                       f"{TARGET_CONCURRENCY} and --batching on,off")
    if not {1, TARGET_CONCURRENCY} <= have or "on" not in cfg.batching:
        missing.append(f"p99 with batching at {TARGET_CONCURRENCY} clients / lone p50: needs --concurrency with 1 and "
                       f"{TARGET_CONCURRENCY}, and --batching on")
    if 1 not in have or 1 not in cfg.workers:
        missing.append("served p50 / raw session.run p50: needs --concurrency with 1 and --workers with 1")
    return missing


def evaluate_scaling(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """QPS of each W-worker server over the one-worker server, batching alike, at the most clients measured."""
    cores = os.cpu_count() or 1
    c = max(cfg.concurrency)
    out = []
    for b in cfg.batching:
        one = _find(rows, b, c, 1)
        for w in cfg.workers:
            many = _find(rows, b, c, w)
            if w == 1 or not one or not many or not one["qps"] or not many["qps"]:
                continue
            note = (f"QPS {many['qps']:.0f} with {w} workers vs {one['qps']:.0f} with 1; p99 {many['p99_ms']:.2f} vs "
                    f"{one['p99_ms']:.2f} ms; mean batch {many['mean_batch']:.1f} vs {one['mean_batch']:.1f}"
                    + _cpu_text(many, cores))
            out.append(row(kind="scaling", model=cfg.model, batching=b, workers=w, concurrency=c,
                           target=f"QPS {w} workers / 1 worker (batching {b}, {c} clients)",
                           value=many["qps"] / one["qps"], note=note))
    return out


# --------------------------------------------------------------------------- output


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _errors_text(by_code: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in by_code.items()) if by_code else "0"


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("batching", lambda r: r["batching"]),
    ("max batch", lambda r: "-" if r["max_batch"] is None else str(r["max_batch"])),
    ("clients", lambda r: str(r["concurrency"])),
    ("workers", lambda r: str(r["workers"])),
    ("QPS", lambda r: "-" if r["qps"] is None else f"{r['qps']:.1f}"),
    ("p50 ms", lambda r: _ms(r["p50_ms"])),
    ("p95 ms", lambda r: _ms(r["p95_ms"])),
    ("p99 ms", lambda r: _ms(r["p99_ms"])),
    ("errors", lambda r: _errors_text(r["errors_by_code"])),
    ("mean batch", lambda r: "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"),
    ("p50/raw", lambda r: "-" if r["overhead"] is None else f"{r['overhead']:.2f}x"),
    ("srv queue", lambda r: _ms(r["server_queue_p50_ms"])),
    ("srv infer", lambda r: _ms(r["server_inference_p50_ms"])),
    ("srv other", lambda r: _ms(r["server_other_p50_ms"])),
    ("net+client", lambda r: _ms(r["transport_p50_ms"])),
    ("serve cost", lambda r: _ms(r["serving_cost_p50_ms"])),
    ("infer busy", lambda r: "-" if r["inference_busy"] is None else f"{r['inference_busy']:.0%}"),
    ("cpu srv", lambda r: "-" if r["server_cpu"] is None else f"{r['server_cpu']:.2f}"),
    ("cpu cli", lambda r: "-" if r["client_cpu"] is None else f"{r['client_cpu']:.2f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[fmt(r) for _, fmt in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def write_json(path: str, rows: list[dict[str, Any]]) -> None:
    """Every row as a JSON list, written atomically (:func:`zoo.fileio.atomic_write`)."""
    atomic_write(path, json.dumps([{k: _json_safe(v) for k, v in r.items()} for r in rows], indent=1))


# --------------------------------------------------------------------------- the run


def _log(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def check_external(cfg: Config, model: Any, x: np.ndarray) -> int | None:
    """The ``--server``'s max batch for the model, after one answer matched the local copy's.

    Raises BenchError when the server is unreachable, does not serve the model, or serves a
    different one (every answer of the run would be a mismatch).
    """
    from serve.client import Classifier, ClientError

    want = _softmax(model.run(x[None]))[0]
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


def run(cfg: Config) -> int:
    from serve.runtime import RepositoryError, load_repository

    root = ensure_model(cfg)
    try:
        repo = load_repository(root, providers="cpu", threads=cfg.threads, models=[cfg.model])
    except RepositoryError as e:
        raise BenchError(str(e)) from None
    model = repo.get(cfg.model)
    assert model is not None
    info = common.machine_info()
    settings, raw, processes = measure(cfg, root, model)
    rows = [setting_row(s, cfg, raw.median_ms, processes) for s in settings]
    rows.append(row(kind="raw", model=cfg.model, threads=cfg.threads, batching="raw session.run", max_batch=1,
                    concurrency=1, rounds=cfg.rounds, requests=len(raw.times_ms), p50_ms=raw.median_ms,
                    p95_ms=_pct(raw.times_ms, 95), p99_ms=_pct(raw.times_ms, 99),
                    mean_ms=float(np.mean(raw.times_ms)), raw_p50_ms=raw.median_ms))
    served = [r for r in rows if r["kind"] == "served"]
    rows += evaluate_targets(served, cfg) + evaluate_scaling(served, cfg)
    print(report(cfg, model, rows, processes, info))
    if cfg.json_path:
        write_json(cfg.json_path, rows)
    return 1 if any(r["errors"] for r in rows if r["kind"] == "served") else 0


def measure(cfg: Config, root: str, model: Any) -> tuple[list[Setting], common.Samples, int]:
    """Start the servers and clients, measure raw and every setting in rounds, stop everything."""
    max_c = max(cfg.concurrency)
    processes = min(cfg.client_processes, max_c)
    round_s = cfg.duration_s / cfg.rounds
    with contextlib.ExitStack() as stack:
        shield = _Shield()
        stack.callback(shield.restore)  # last out
        servers: dict[tuple[str, int], ServerProcess] = {}
        if cfg.server is None:
            for b in cfg.batching:  # all started at once: their model loads overlap
                for w in cfg.workers:
                    servers[b, w] = ServerProcess(server_label(b, w), server_command(cfg, root, MAX_BATCH[b], w), w)
                    stack.callback(servers[b, w].stop)
        pool = ClientPool(processes, math.ceil(max_c / processes), root, cfg.model, cfg.seed,
                          own_connection=max(cfg.workers) > 1)
        stack.callback(pool.close)
        stack.callback(shield.ignore)  # first out: Ctrl-C cannot cut the stops short
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        targets = {key: f"{HOST}:{s.wait_ready(deadline)}" for key, s in servers.items()}
        summaries = pool.wait_ready()
        first_inputs = summaries[0]["first_inputs"]
        max_batches: dict[str, int | None] = {b: MAX_BATCH.get(b) for b in cfg.batching}
        if cfg.server is not None:
            max_batches["external"] = check_external(cfg, model, first_inputs[0])
            targets["external", 1] = cfg.server
        settings = [Setting(b, c, max_batches[b], targets[b, w], servers.get((b, w)), workers=w)
                    for b in cfg.batching for w in cfg.workers for c in cfg.concurrency]
        _log(f"{cfg.model} {'x'.join(map(str, model.input_size))} from {model.path}; "
             + ", ".join(f"{server_label(b, w)} at {t}" for (b, w), t in targets.items())
             + f"; {processes} client processes with {', '.join(str(s['inputs']) for s in summaries)} inputs in "
             f"{', '.join(str(s['classes']) for s in summaries)} classes; {cfg.rounds} rounds of {round_s:g} s")
        raw = common.Samples()
        for _ in range(2):  # untimed: onnxruntime's first calls on this shape
            model.run(first_inputs[0][None])
        for r in range(cfg.rounds):
            measure_raw(model.run, first_inputs, round_s * RAW_SHARE, raw)
            k = r % len(settings)
            order = settings[k:] + settings[:k]
            if r % 2:
                order.reverse()
            for s in order:
                before = len(s.data["latency_ms"])
                measure_setting(s, pool, round_s, math.ceil(cfg.max_requests / cfg.rounds))
                _log(f"round {r + 1}/{cfg.rounds}: {s.label}: {len(s.data['latency_ms']) - before} answers, "
                     f"{sum(s.errors.values())} errors so far")
    return settings, raw, processes


def report(cfg: Config, model: Any, rows: list[dict[str, Any]], processes: int, info: dict[str, str]) -> str:
    """The terminal report: context, raw session.run, the table, its legend and the targets."""
    served = [r for r in rows if r["kind"] == "served"]
    raw = next(r for r in rows if r["kind"] == "raw")
    targets = [r for r in rows if r["kind"] == "target"]
    scaling = [r for r in rows if r["kind"] == "scaling"]
    end_load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [
        f"{cfg.model} ({'x'.join(map(str, model.input_size))}), server onnxruntime threads {cfg.threads}"
        + (" (split over a server's workers)" if max(cfg.workers) > 1 else "") + f", {processes} client processes"
        + (", a connection per client" if max(cfg.workers) > 1 else "")
        + f", {cfg.rounds} rounds, {cfg.duration_s:g} s measured per setting; "
        f"{info['cpu']}, {info['cores']} cores, loadavg {info.get('loadavg', '?')} at start, {end_load} at end",
        f"raw session.run at batch 1 ({cfg.threads} threads, this process, same inputs): p50 {raw['p50_ms']:.2f} ms, "
        f"p95 {raw['p95_ms']:.2f} ms over {raw['requests']} calls",
        format_table(served),
        "ms, client-observed; the parts are p50s of their own (they need not add up): srv queue = arrival to its "
        "batch's start (batching on: up to the batch timeout), srv infer = its batch's session.run, srv other = "
        "decode and reply, net+client = client latency - server total, serve cost = client latency - its own "
        "inference (what serving adds, robust to inference noise); infer busy = share of the window the "
        "model ran; cpu = cores used by the server and by all clients",
    ]
    if targets:
        lines.append("targets (measured, not asserted):")
        for t in targets:
            sign = ">=" if t["target"].startswith("batching") else "<="
            lines.append(f"  {t['target']}: {t['value']:.2f}x (target {sign} {t['threshold']:g}x): "
                         f"{'met' if t['met'] else 'MISSED'}")
            lines.append(f"    {'detail' if t['met'] else 'bound'}: {t['note']}")
    missing = unmeasured_targets(cfg)
    if missing:
        lines.append(f"targets not measured by this run's settings (the defaults measure all; --quick measures "
                     f"{','.join(map(str, QUICK_CONCURRENCY))} clients only):")
        lines += [f"  {m}" for m in missing]
    if scaling:
        lines.append("scale-out on this machine (measured):")
        for t in scaling:
            lines.append(f"  {t['target']}: {t['value']:.2f}x")
            lines.append(f"    detail: {t['note']}")
    failed = sum(r["errors"] for r in served)
    if failed:
        lines.append(f"{failed} requests failed or did not match their input (errors column)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
