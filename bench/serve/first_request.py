"""``python -m bench.serve --first-request N``: a fresh server's first request, with the warmup at
load and without (``python -m serve --no-warmup``).

``python -m serve`` runs every model at batch 1 and its batch limit (or config.pbtxt's
``model_warmup``) before marking it ready; with ``--no-warmup`` the first request at a batch size
pays onnxruntime's first run of that shape (memory arenas, kernel selection) itself. This mode
starts N fresh servers per mode on the model, in turn (on, off, off, on, ...: a drift of the
machine over the run falls on both modes alike), each exactly as the load's servers are started
(:func:`~bench.serve.servers.server_command`, one ``--batching`` setting's ``--max-batch``). For
each: wait for its ready line (which says whether it warmed up and how long that took), open one
:class:`serve.client.Classifier` and its connection (ListModels, which runs no model), then time
the first Classify and the ``STEADY_REQUESTS`` after it at batch 1, every answer checked against
what onnxruntime computed for its input here (:func:`~bench.serve.clients.choose_inputs`); then stop
the server. Per mode: median and max of the first request, median of the following ones, and
first / steady. Nothing is asserted; exit status 1 when any request failed or mismatched.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from typing import Any

import numpy as np

from bench.serve.clients import choose_inputs
from bench.serve.config import (
    CALL_TIMEOUT_S,
    HOST,
    INPUTS_PER_CLIENT,
    MAX_BATCH,
    MISMATCH,
    PROG,
    SCORE_RTOL,
    SERVER_START_TIMEOUT_S,
    TOP_K,
    BenchError,
    Config,
)
from bench.serve.servers import ServerProcess, ensure_model, server_command
from contract.cli import text_table
from serve.ready import parse_ready_line

# Requests timed after the first one, on the same connection: the steady latency it is compared with.
STEADY_REQUESTS = 5
MODES = {"on": [], "off": ["--no-warmup"]}  # warmup -> the server's extra flags
_WARMED_RE = re.compile(r"; warmed up in ([0-9.]+) s\b")
_NO_WARMUP = "; no warmup"


# Every option of python -m bench.serve that this mode does not honour, in the order the parser
# lists them (the first one given is the one named), with why.
_FRESH = "not with --first-request, which starts fresh python -m serve servers of its own"
_LOAD = "applies to the load; --first-request times one gRPC client on one server"
UNHONOURED = (
    ("--server", "server", _FRESH),
    ("--http-server", "http_server", _FRESH),
    ("--peer", "peer", _FRESH),
    ("--peer-python", "peer_python", _FRESH),
    ("--concurrency", "concurrency", _LOAD),
    ("--duration", "duration", _LOAD),
    ("--workers", "workers", _LOAD),
    ("--instances", "instances", _LOAD),
    ("--protocol", "protocol", _LOAD),
    ("--client-processes", "client_processes", _LOAD),
    ("--rounds", "rounds", _LOAD),
    ("--max-requests", "max_requests", _LOAD),
    ("--quick", "quick", _LOAD),
)


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A bad combination with ``--first-request`` is one parser error naming an option the user
    gave; called before the load's own checks, which would name another."""
    if args.first_request < 1:
        parser.error(f"Invalid --first-request: {args.first_request} (at least 1 server per mode)")
    for flag, dest, why in UNHONOURED:
        if getattr(args, dest) not in (None, False):
            parser.error(f"{flag}: {why}")
    if args.batching is not None and len({b.lower() for b in args.batching}) != 1:
        parser.error("--batching: --first-request takes one setting (on or off), the --max-batch of every server")


def warmup_of(ready_line: str) -> tuple[bool | None, float | None]:
    """What a ready line says of the warmup: (warmed up, its seconds); None where it does not say."""
    found = _WARMED_RE.search(ready_line)
    if found:
        return True, float(found.group(1))
    return (False, None) if _NO_WARMUP in ready_line else (None, None)


def _time_requests(target: str, model: str, inputs: list[np.ndarray], expected: list[tuple[int, float]],
                   ) -> tuple[list[float | None], list[float | None], collections.Counter]:
    """The first Classify and ``STEADY_REQUESTS`` more on one connection: client ms and server
    inference ms of each (None for a failed or wrong answer), and the errors by code."""
    from serve.client import Classifier, ClientError

    latency: list[float | None] = []
    inference: list[float | None] = []
    errors: collections.Counter = collections.Counter()
    with Classifier(target, timeout=CALL_TIMEOUT_S) as client:
        try:
            client.list_models()  # the connection is up before the clock starts
        except ClientError as e:
            raise BenchError(f"server {target}: ListModels: {e.code.name}: {e.message}") from None
        for i in range(1 + STEADY_REQUESTS):
            x, (want_class, want_score) = inputs[i % len(inputs)], expected[i % len(expected)]
            began = time.perf_counter()
            try:
                r = client.classify(x, model=model, top_k=TOP_K, timeout=CALL_TIMEOUT_S)
                code = None
            except ClientError as e:
                r, code = None, e.code.name
            ms = (time.perf_counter() - began) * 1e3
            if r is not None:
                top = r.classes[0] if r.classes else None
                ok = (top is not None and top.index == want_class
                      and abs(top.score - want_score) <= SCORE_RTOL * want_score)
                code = None if ok else MISMATCH
            if code is not None:
                errors[code] += 1
            latency.append(None if code else ms)
            inference.append(None if code else r.timing["inference"] / 1e3)
    return latency, inference, errors


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _one_server(cfg: Config, root: str, mode: str, index: int, max_batch: int, inputs: list[np.ndarray],
                expected: list[tuple[int, float]]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    began = time.perf_counter()
    server = ServerProcess(f"warmup {mode}", server_command(cfg, root, max_batch) + MODES[mode])
    try:
        port = server.wait_ready(time.monotonic() + SERVER_START_TIMEOUT_S)
        ready_s = time.perf_counter() - began
        line = next((ln for ln in server.lines if parse_ready_line(ln) is not None), "")
        latency, inference, errors = _time_requests(f"{HOST}:{port}", cfg.model, inputs, expected)
    finally:
        server.stop()
    warmed, warmup_s = warmup_of(line)
    return dict(kind="first_request", model=cfg.model, warmup=mode, run=index, server_flags=MODES[mode],
                max_batch=max_batch, threads=cfg.threads, loadavg=load, ready_s=ready_s, server_warmed_up=warmed,
                server_warmup_s=warmup_s, first_ms=latency[0], first_server_inference_ms=inference[0],
                steady_ms=_median(latency[1:]), steady_server_inference_ms=_median(inference[1:]),
                requests=len(latency), errors=sum(errors.values()), errors_by_code=dict(sorted(errors.items())))


def mode_row(mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures over its servers."""
    first = [r["first_ms"] for r in runs if r["first_ms"] is not None]
    steady = _median([r["steady_ms"] for r in runs])
    first_p50 = float(np.median(first)) if first else None
    return dict(kind="first_request_mode", model=runs[0]["model"], warmup=mode, servers=len(runs),
                first_p50_ms=first_p50, first_max_ms=max(first) if first else None, steady_p50_ms=steady,
                first_over_steady=first_p50 / steady if first_p50 is not None and steady else None,
                first_server_inference_p50_ms=_median([r["first_server_inference_ms"] for r in runs]),
                steady_server_inference_p50_ms=_median([r["steady_server_inference_ms"] for r in runs]),
                server_warmup_p50_s=_median([r["server_warmup_s"] for r in runs]),
                ready_p50_s=_median([r["ready_s"] for r in runs]), errors=sum(r["errors"] for r in runs))


def _ms(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(cfg: Config, input_size: Any, max_batch: int, n: int, rows: list[dict[str, Any]],
           loads: tuple[str, str]) -> str:
    modes = [r for r in rows if r["kind"] == "first_request_mode"]
    body = [[r["warmup"], str(r["servers"]), _ms(r["server_warmup_p50_s"]), _ms(r["ready_p50_s"]),
             _ms(r["first_p50_ms"]), _ms(r["first_max_ms"]), _ms(r["steady_p50_ms"]),
             _ms(r["first_over_steady"], "{:.1f}x"),
             f"{_ms(r['first_server_inference_p50_ms'])} / {_ms(r['steady_server_inference_p50_ms'])}",
             str(r["errors"])] for r in modes]
    lines = [f"first request: {cfg.model} ({'x'.join(map(str, input_size))}), {n} fresh python -m serve per mode "
             f"(--max-batch {max_batch}, --threads {cfg.threads}), one gRPC client each: ListModels to connect, "
             f"then Classify at batch 1 once (first) and {STEADY_REQUESTS} times more (steady)",
             f"load average {loads[0]} at the start, {loads[1]} at the end",
             "",
             text_table(["warmup", "servers", "warmup s", "ready s", "first p50 ms", "first max ms", "steady p50 ms",
                         "first/steady", "server inference first / steady ms", "errors"], body),
             "",
             "warmup s: what the server's ready line says its warmup took (batch 1 and --max-batch); ready s: "
             "from process start to the ready line; server inference: onnxruntime's time for the request, as the "
             "server reports it (p50 over the servers)"]
    on, off = (next((r for r in modes if r["warmup"] == m), None) for m in ("on", "off"))
    if on and off and on["first_p50_ms"] and off["first_p50_ms"]:
        lines.append(f"without warmup the first request took {off['first_p50_ms'] / on['first_p50_ms']:.1f}x "
                     f"as long (p50 {off['first_p50_ms']:.2f} vs {on['first_p50_ms']:.2f} ms)")
    return "\n".join(lines)


def run(cfg: Config, n: int) -> int:
    """``n`` servers per mode, in turn; prints the report, writes ``cfg.json_path``; 1 on any error."""
    from serve.runtime import RepositoryError, load_repository
    from zoo.fileio import atomic_write

    start_load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    root = ensure_model(cfg)
    try:
        repo = load_repository(root, providers="cpu", threads=cfg.threads, models=[cfg.model])
    except RepositoryError as e:
        raise BenchError(str(e)) from None
    model = repo.get(cfg.model)
    input_size = model.input_size
    inputs, expected = choose_inputs(model.run, input_size, np.random.default_rng(cfg.seed), INPUTS_PER_CLIENT)
    del repo, model  # its session's memory goes back before the servers start
    max_batch = MAX_BATCH[cfg.batching[0]]
    order = [m for i in range(n) for m in (("on", "off") if i % 2 == 0 else ("off", "on"))]
    runs: list[dict[str, Any]] = []
    for i, mode in enumerate(order, 1):
        r = _one_server(cfg, root, mode, i, max_batch, inputs, expected)
        runs.append(r)
        print(f"{PROG}: server {i}/{len(order)} (warmup {mode}): ready in {r['ready_s']:.1f} s, first request "
              f"{_ms(r['first_ms'])} ms, then {_ms(r['steady_ms'])} ms, {r['errors']} errors", file=sys.stderr,
              flush=True)
    rows = runs + [mode_row(m, [r for r in runs if r["warmup"] == m]) for m in MODES]
    end_load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(report(cfg, input_size, max_batch, n, rows, (start_load, end_load)))
    if cfg.json_path:
        atomic_write(cfg.json_path, json.dumps(rows, indent=1))
    return 1 if any(r["errors"] for r in runs) else 0

