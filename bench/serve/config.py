"""What a ``python -m bench.serve`` run is made of: every default, the resolved :class:`Config`, and
the row every result is written as."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bench._common import EXPORT_CACHE

PROG = "python -m bench.serve"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every default in one place.
DEFAULT_MODEL = "resnext_mini"
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_DURATION_S = 10.0  # measured seconds per setting, over all rounds
DEFAULT_BATCHING = ("on", "off")
DEFAULT_WORKERS = (1,)
DEFAULT_PROTOCOLS = ("grpc",)
# --protocol names (bench.serve.protocols has their clients); http ones need the server's HTTP port.
PROTOCOL_NAMES = ("grpc", "grpc-infer", "http", "http-json")
HTTP_PROTOCOLS = ("http", "http-json")
ECHO = "echo"  # the bare gRPC round trip (bench.serve.echo): a row of its own in every run
PEERS = ("kserve",)  # --peer: another server on the same model (bench.serve.peer), in the same rounds
PEER_PROTOCOLS = ("grpc-infer", "http", "http-json")  # a peer serves the Open Inference Protocol only
QUICK_CONCURRENCY, QUICK_DURATION_S = (1, 4), 2.0
DEFAULT_CACHE = EXPORT_CACHE  # bench.latency's too (bench._common owns its layout)
MAX_BATCH = {"on": 16, "off": 1}  # python -m serve --max-batch
HOST = "127.0.0.1"
# A setting's --duration is split into rounds of at least ROUND_MIN_S, at most MAX_ROUNDS of them.
ROUND_MIN_S, MAX_ROUNDS = 2.0, 4
# Each setting's clients run this long untimed before its window (connections, server threads,
# onnxruntime's buffers for the batch sizes this load produces).
WARMUP_S = 0.5
# Raw session.run gets this share of a round's length per round, and at least RAW_MIN_CALLS calls.
RAW_SHARE, RAW_MIN_CALLS = 1.0, 5
# Raw session.run again with the model left idle this long before each call, about one round trip
# of a one-client server here: a model that waits between calls runs slower than in a tight loop
# (cold caches, sleeping threads), and that part of a served call is the machine's, not serving's.
# It gets IDLE_RAW_SHARE of a round's length per round (its sleeps included).
IDLE_GAP_S, IDLE_RAW_SHARE = 0.001, 0.5
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
HTTP_OVER_GRPC_TARGET = 1.3  # HTTP binary p50 / gRPC p50 (the same operation: ModelInfer when measured), one client
ECHO_GAP_TARGET_MS = 0.3  # served p50 at one client - (bare gRPC echo p50 + raw session.run p50)
PEER_QPS_TARGET = 1.5  # QPS over the peer's at TARGET_CONCURRENCY clients (--peer)
CPU_PROBE_S = 1.0  # seconds of session.run per batch size for the model's CPU per row (at least 3 calls)
MISMATCH = "MISMATCH"  # the error code of a wrong answer

# Every JSON row has every key (None where it does not apply), so the rows load as one table.
ROW_KEYS = (
    "kind", "model", "batching", "max_batch", "workers", "concurrency", "client_processes", "threads", "rounds",
    "window_s", "requests", "checked", "qps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "errors",
    "errors_by_code", "mismatches", "mean_batch", "raw_p50_ms", "overhead", "server_total_p50_ms",
    "server_queue_p50_ms", "server_inference_p50_ms", "server_other_p50_ms", "transport_p50_ms",
    "serving_cost_p50_ms", "inference_busy", "server_cpu", "client_cpu", "target", "value", "threshold", "met", "note",
    "protocol", "tail_ratio", "echo_p50_ms", "echo_gap_ms", "unit", "qps_ratio", "p50_ratio", "p99_ratio",
    "peer_echo_gap_ms", "cpu_note", "cpu_per_row_ms", "raw_idle_p50_ms",
    "worker_connections",
)


class BenchError(Exception):
    """The benchmark cannot run: one line, exit 1."""


def row(**kw: Any) -> dict[str, Any]:
    unknown = set(kw) - set(ROW_KEYS)
    assert not unknown, unknown
    return {k: kw.get(k) for k in ROW_KEYS}


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
    protocols: list[str] = field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    http_server: str | None = None  # HOST:PORT of --server's HTTP side (--http-server)
    peer: str | None = None  # --peer: measured beside the servers, every PEER_PROTOCOLS protocol of the run
    instances: int = 1  # python -m serve --instances of the servers started
    peer_python: str | None = None  # --peer-python; None: bench.serve.peer.default_python()
    spinning: bool = False  # --ort-spinning: servers, peer and raw session.run alike
