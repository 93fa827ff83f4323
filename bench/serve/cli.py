"""The command line of ``python -m bench.serve``: options, their checks, and one run from start to
report."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Sequence

import numpy as np

from bench import _common as common
from bench.serve.config import (
    DEFAULT_BATCHING,
    DEFAULT_CACHE,
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_MODEL,
    DEFAULT_PROTOCOLS,
    DEFAULT_WORKERS,
    HTTP_PROTOCOLS,
    MAX_BATCH,
    MAX_REQUESTS,
    MAX_ROUNDS,
    PEER_PROTOCOLS,
    PEERS,
    PROG,
    PROTOCOL_NAMES,
    QUICK_CONCURRENCY,
    QUICK_DURATION_S,
    ROUND_MIN_S,
    TARGET_CONCURRENCY,
    BenchError,
    Config,
    row,
)
from bench.serve import first_request
from bench.serve.measure import add_echo_gaps, measure, pct, setting_row
from bench.serve.protocols import PROTOCOLS
from bench.serve.report import evaluate_peer, evaluate_protocols, evaluate_scaling, evaluate_targets, report, write_json
from bench.serve.servers import ensure_model
from contract.cli import HelpFormatter


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that everything started is stopped on the way out."""


def build_parser() -> argparse.ArgumentParser:
    import bench.serve  # its docstring describes the tool

    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog=PROG, description=(bench.serve.__doc__ or "").split("\n")[0],
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
    w.add_argument("--http-server", metavar="HOST:PORT", default=None,
                   help="the HTTP address of --server, for --protocol http or http-json")
    w.add_argument("--peer", choices=PEERS, default=None,
                   help="also measure this server on the same model file, in the same rounds, with the same "
                        "Open Inference Protocol clients (--protocol grpc-infer, http, http-json); paired "
                        "per-round ratios of QPS, p50 and p99 (see bench.serve.peer)")
    w.add_argument("--peer-python", metavar="PATH", default=None,
                   help="the Python that has the peer's package (default: $ZOO_KSERVE_PYTHON, else "
                        ".venv-kserve/bin/python)")
    w.add_argument("--threads", type=int, default=cores,
                   help="onnxruntime intra-op threads of the servers started and of the raw session.run")
    w.add_argument("--ort-spinning", action="store_true",
                   help="onnxruntime's threads spin while idle (python -m serve --ort-spinning) in the servers "
                        "started, the peer and the raw session.run alike (default: they sleep, as in serve)")
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
    m.add_argument("--instances", type=int, default=None,
                   help="python -m serve --instances of the servers started (model calls at once, each on its own "
                        "session with a share of --threads) (default 1); not with --server")
    m.add_argument("--protocol", type=common.csv_list(str), default=None,
                   help=f"what the clients send, comma-separated (default {','.join(DEFAULT_PROTOCOLS)}): "
                        + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()))
    m.add_argument("--client-processes", type=int, default=None,
                   help=f"processes the clients are spread over, at most one per client (default {cores}: the cores)")
    m.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds (default: one per {ROUND_MIN_S:g} s of --duration, at most {MAX_ROUNDS})")
    m.add_argument("--max-requests", type=int, default=None,
                   help=f"measured requests per setting at most (default {MAX_REQUESTS:,})")
    m.add_argument("--seed", type=int, default=0, help="seed of the clients' inputs")
    m.add_argument("--quick", action="store_true",
                   help=f"{DEFAULT_MODEL}, concurrency {','.join(map(str, QUICK_CONCURRENCY))}, "
                        f"{QUICK_DURATION_S:g} s each (a smoke run: the targets at {TARGET_CONCURRENCY} clients are "
                        "not measured); explicit options still win")
    f = p.add_argument_group("first request")
    f.add_argument("--first-request", type=int, default=None, metavar="N",
                   help="instead of the load: N fresh servers with warmup at load and N with --no-warmup, in turn; "
                        "one client's first request and the few after it, timed")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="every row (settings, raw, targets) as a JSON list")
    return p


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
        if args.instances is not None:
            parser.error("--instances: applies to the servers this tool starts")
        batching = ["external"]
    else:
        batching = list(dict.fromkeys(b.lower() for b in (args.batching or DEFAULT_BATCHING)))
        bad = [b for b in batching if b not in MAX_BATCH]
        if bad:
            parser.error(f"--batching: unknown {', '.join(bad)}; choose from {', '.join(MAX_BATCH)}")
    protocols = list(dict.fromkeys(p.lower() for p in (args.protocol or DEFAULT_PROTOCOLS)))
    bad = [p for p in protocols if p not in PROTOCOL_NAMES]
    if bad:
        parser.error(f"--protocol: unknown {', '.join(bad)}; choose from {', '.join(PROTOCOL_NAMES)}")
    http = [p for p in protocols if p in HTTP_PROTOCOLS]
    if args.http_server is not None:
        host, sep, port = args.http_server.rpartition(":")
        if args.server is None:
            parser.error("--http-server: applies with --server; the servers this tool starts have their own")
        if not sep or not host or not port.isdigit():
            parser.error(f"--http-server {args.http_server!r}: expected HOST:PORT")
    elif args.server is not None and http:
        parser.error(f"--protocol {','.join(http)} with --server: pass --http-server HOST:PORT, the HTTP address "
                     "of that server")
    if args.peer_python is not None and args.peer is None:
        parser.error("--peer-python: applies with --peer")
    if args.peer is not None and not set(protocols) & set(PEER_PROTOCOLS):
        parser.error(f"--peer {args.peer}: it serves the Open Inference Protocol only; add one of "
                     f"{', '.join(PEER_PROTOCOLS)} to --protocol")
    workers = list(dict.fromkeys(args.workers or DEFAULT_WORKERS))
    if any(w < 1 for w in workers):
        parser.error(f"--workers: at least 1, got {','.join(map(str, workers))}")
    client_processes = args.client_processes if args.client_processes is not None else os.cpu_count() or 1
    max_requests = args.max_requests if args.max_requests is not None else MAX_REQUESTS
    for flag, value in (("--threads", args.threads), ("--client-processes", client_processes),
                        ("--max-requests", max_requests),
                        ("--instances", 1 if args.instances is None else args.instances)):
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
                  client_processes=client_processes, rounds=rounds, max_requests=max_requests,
                  seed=args.seed, json_path=args.json, protocols=protocols, http_server=args.http_server,
                  peer=args.peer, peer_python=args.peer_python, spinning=args.ort_spinning,
                  instances=args.instances or 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.first_request is not None:
        first_request.check_options(parser, args)
    cfg = resolve_config(parser, args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(cfg) if args.first_request is None else first_request.run(cfg, args.first_request)
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


def run(cfg: Config) -> int:
    from serve.runtime import RepositoryError, load_repository

    root = ensure_model(cfg)
    try:
        repo = load_repository(root, providers="cpu", threads=cfg.threads, models=[cfg.model], spinning=cfg.spinning)
    except RepositoryError as e:
        raise BenchError(str(e)) from None
    model = repo.get(cfg.model)
    assert model is not None
    info = common.machine_info()
    settings, raw, raw_idle, processes, cpu_per_row = measure(cfg, root, model)
    rows = [setting_row(s, cfg, raw.median_ms, processes) for s in settings]
    add_echo_gaps(rows, raw_idle.median_ms)
    rows.append(row(kind="raw", model=cfg.model, threads=cfg.threads, batching="raw session.run", max_batch=1,
                    concurrency=1, rounds=cfg.rounds, requests=len(raw.times_ms), p50_ms=raw.median_ms,
                    p95_ms=pct(raw.times_ms, 95), p99_ms=pct(raw.times_ms, 99),
                    mean_ms=float(np.mean(raw.times_ms)), raw_p50_ms=raw.median_ms, raw_idle_p50_ms=raw_idle.median_ms,
                    cpu_per_row_ms=cpu_per_row))  # by batch size (JSON writes the keys as strings)
    served = [r for r in rows if r["kind"] == "served"]
    rows += evaluate_targets(served, cfg) + evaluate_scaling(served, cfg) + evaluate_protocols(served, cfg)
    rows += evaluate_peer(settings, cfg, rows)
    print(report(cfg, model, rows, processes, info))
    if cfg.json_path:
        write_json(cfg.json_path, rows)
    return 1 if any(r["errors"] for r in rows if r["kind"] in ("served", "echo")) else 0
