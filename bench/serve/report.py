"""The report of a run: the targets (measured, never asserted), the terminal table and the JSON rows."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

from bench.serve.config import (
    BATCHING_GAIN_TARGET,
    ECHO_GAP_TARGET_MS,
    IDLE_GAP_S,
    HTTP_OVER_GRPC_TARGET,
    OVERHEAD_TARGET,
    P99_OVER_LONE_TARGET,
    PEER_QPS_TARGET,
    QUICK_CONCURRENCY,
    TARGET_CONCURRENCY,
    Config,
    row,
)
from bench.serve.measure import ratio
from bench.serve.protocols import ECHO_REPLY
from bench.serve.servers import server_label
from contract.cli import text_table
from zoo.fileio import atomic_write


def _find(rows: list[dict[str, Any]], batching: str, concurrency: int, workers: int = 1,
          protocol: str = "grpc") -> dict[str, Any] | None:
    """The served row of one setting (the batching and scaling targets read Classify's rows: only
    its answers carry the server's timing and batch size)."""
    return next((r for r in rows if r["kind"] == "served" and r["batching"] == batching
                 and r["concurrency"] == concurrency and r["workers"] == workers and r["protocol"] == protocol), None)


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
        cost = ratio(ratio(on["server_inference_p50_ms"], on["mean_batch"]), off["server_inference_p50_ms"])
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
        per_item = ratio(on["server_inference_p50_ms"], on["mean_batch"])
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
        # The parts need the server's timing, which only Classify's answer carries.
        if r["concurrency"] != 1 or r["overhead"] is None or r["workers"] != 1 or r["protocol"] != "grpc":
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
    out += _echo_targets(rows, cfg) + _http_targets(rows, cfg)
    return out


def _echo_targets(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["kind"] != "served" or r["echo_gap_ms"] is None or r["workers"] != 1:
            continue
        note = (f"served p50 {r['p50_ms']:.3f} ms vs bare gRPC echo p50 {r['echo_p50_ms']:.3f} ms + raw session.run "
                f"p50 {r['raw_p50_ms']:.3f} ms; one-client tail p99/p50 {r['tail_ratio']:.2f}")
        idle = r["raw_idle_p50_ms"]
        if idle is not None:  # the model alone, slower when it waits between calls: the machine's share of the gap
            note += (f"; the model alone after {IDLE_GAP_S * 1e3:g} ms idle: p50 {idle:.3f} ms "
                     f"({idle - r['raw_p50_ms']:+.3f} ms of the gap), "
                     f"served p50 - (echo p50 + that) {r['p50_ms'] - r['echo_p50_ms'] - idle:.3f} ms")
        out.append(row(kind="target", model=cfg.model, concurrency=1, batching=r["batching"], workers=r["workers"],
                       protocol=r["protocol"], unit="ms",
                       target=f"served p50 - (echo p50 + raw p50) ({server_label(r['batching'], 1)}, {r['protocol']})",
                       value=r["echo_gap_ms"], threshold=ECHO_GAP_TARGET_MS, met=r["echo_gap_ms"] <= ECHO_GAP_TARGET_MS,
                       note=note))
    return out


def _batchings(rows: list[dict[str, Any]]) -> list[str]:
    """The servers measured (the batching values of the servers started, external, a peer), in row order."""
    return list(dict.fromkeys(r["batching"] for r in rows if r["kind"] == "served"))


def evaluate_peer(settings: list[Any], cfg: Config, rows: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Each server setting (``--workers`` ones too) over the ``--peer``'s with the same protocol and clients:
    QPS, p50 and p99 ratios taken round by round (the two measured minutes apart at most, in
    rotating order), their median over the rounds; above 1 for QPS, below 1 for p50 and p99
    favours this server. At one client, the echo gaps of both (``echo_gap_ms`` this server's,
    ``peer_echo_gap_ms`` the peer's) from the served ``rows``."""
    import statistics

    if cfg.peer is None:
        return []
    peer = {(s.protocol, s.concurrency): s for s in settings if s.batching == cfg.peer}
    gaps = {(r["batching"], r["protocol"]): r["echo_gap_ms"] for r in rows
            if r["kind"] == "served" and r["concurrency"] == 1 and r["workers"] == 1}
    served = {(r["batching"], r["protocol"], r["concurrency"], r["workers"]): r for r in rows if r["kind"] == "served"}
    raw = next((r for r in rows if r["kind"] == "raw"), None)
    cpu_per_row = (raw or {}).get("cpu_per_row_ms") or {}
    echo_ms = {r["concurrency"]: ms for r in rows
               if r["kind"] == "echo" and (ms := _server_cpu_ms_per_call(r)) is not None}
    out = []
    for s in settings:
        k = peer.get((s.protocol, s.concurrency))
        if k is None or s is k or s.batching == cfg.peer:
            continue
        one = s.workers == 1  # the echo gap and the model's CPU per row (raw's threads) are one process's figures
        paired: dict[str, list[float]] = {"qps": [], "p50_ms": [], "p99_ms": []}
        for mine, theirs in zip(s.per_round, k.per_round):
            for key, values in paired.items():
                r = ratio(mine[key], theirs[key])
                if r is not None:
                    values.append(r)
        medians = {key: statistics.median(v) if v else None for key, v in paired.items()}
        note = "; ".join(f"{key.removesuffix('_ms')} per round " + " ".join(f"{v:.2f}" for v in values)
                         for key, values in paired.items())
        out.append(row(kind="peer", model=cfg.model, batching=s.batching, max_batch=s.max_batch, workers=s.workers,
                       concurrency=s.concurrency, protocol=s.protocol, rounds=len(paired["qps"]),
                       target=f"{server_label(s.batching, s.workers)} / {cfg.peer} ({s.protocol}, {s.concurrency} "
                              f"client{'s' if s.concurrency > 1 else ''})",
                       value=medians["p50_ms"], qps_ratio=medians["qps"], p50_ratio=medians["p50_ms"],
                       p99_ratio=medians["p99_ms"], unit="x", note=note,
                       echo_gap_ms=gaps.get((s.batching, s.protocol)) if s.concurrency == 1 and one else None,
                       peer_echo_gap_ms=gaps.get((cfg.peer, s.protocol)) if s.concurrency == 1 and one else None,
                       cpu_note=_cpu_budget(served.get((s.batching, s.protocol, s.concurrency, s.workers)),
                                            served.get((cfg.peer, s.protocol, s.concurrency, 1)), cfg.peer,
                                            cpu_per_row.get(s.max_batch) if one else None,
                                            echo_ms.get(s.concurrency))))
    return out


def _server_cpu_ms_per_call(r: dict[str, Any]) -> float | None:
    """The server's CPU ms per answer of a measured row (None without its CPU or answers)."""
    return 1e3 * r["server_cpu"] / r["qps"] if r["qps"] and r["server_cpu"] is not None else None


def _cpu_budget(mine: dict[str, Any] | None, theirs: dict[str, Any] | None, peer: str,
                model_row_ms: float | None = None, echo_ms: float | None = None) -> str | None:
    """What bounds a throughput ratio when the machine's cores are the limit: each server's CPU per
    answer (its own and its clients'), and the QPS this server would reach were every core busy at
    that cost, over the peer's measured QPS. With ``model_row_ms`` (the model's CPU per row at this
    server's largest batch, :func:`bench.serve.measure.model_cpu_per_row`), also what reaching
    PEER_QPS_TARGET x the peer's QPS at the peer's cost leaves for everything but the model: the
    server's own work per answer (gRPC, Python, batching) must fit in it. With ``echo_ms`` (the bare
    gRPC echo server's CPU per call under the same number of clients), that floor beside it: a
    server on grpc's Python server cannot serve for less."""
    if mine is None or theirs is None or mine["concurrency"] == 1:
        return None
    cost = {}
    for name, r in (("this server", mine), (peer, theirs)):
        if not r["qps"] or r["server_cpu"] is None or r["client_cpu"] is None:
            return None
        cost[name] = (1e3 * r["server_cpu"] / r["qps"], 1e3 * r["client_cpu"] / r["qps"])
    cores = os.cpu_count() or 1
    ceiling = cores * 1e3 / sum(cost["this server"])
    note = ("CPU ms per answer, server + its clients: " + ", ".join(f"{k} {s:.2f} + {c:.2f}" for k, (s, c) in
                                                                       cost.items())
            + f"; with all {cores} cores busy at that cost this server would answer {ceiling:.0f} QPS, "
              f"{ceiling / theirs['qps']:.2f}x {peer}'s {theirs['qps']:.0f}")
    if model_row_ms:
        server, clients = cost["this server"]
        allowed = sum(cost[peer]) / PEER_QPS_TARGET
        note += (f"; {PEER_QPS_TARGET:g}x {peer}'s QPS at its cost allows this server {allowed:.2f} ms per answer: "
                 f"less the model batched ({model_row_ms:.2f} ms a row) and its clients ({clients:.2f}), "
                 f"{allowed - model_row_ms - clients:.2f} ms for serving, which takes {server - model_row_ms:.2f}")
        if echo_ms is not None:
            left = allowed - model_row_ms - clients
            note += (f"; a bare gRPC echo server takes {echo_ms:.2f} ms per call at {mine['concurrency']} clients"
                     + (": the room left is below what gRPC alone costs here" if left < echo_ms else ""))
    return note


def http_reference(protocols: list[str]) -> str | None:
    """What HTTP is compared with: the same operation over gRPC (ModelInfer) when it was measured, else Classify."""
    return next((p for p in ("grpc-infer", "grpc") if p in protocols), None)


def evaluate_protocols(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """HTTP binary and HTTP JSON p50 over gRPC p50 (and QPS alike) for every setting measured on both."""
    ref_name = http_reference(cfg.protocols)
    out = []
    for http in ("http", "http-json"):
        if ref_name is None or http not in cfg.protocols:
            continue
        for b in _batchings(rows):
            for w in cfg.workers:
                for c in cfg.concurrency:
                    ref, r = _find(rows, b, c, w, ref_name), _find(rows, b, c, w, http)
                    if not ref or not r or not ref["p50_ms"] or not r["p50_ms"]:
                        continue
                    note = (f"p50 {r['p50_ms']:.3f} vs {ref['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} vs "
                            f"{ref['p99_ms']:.3f} ms, QPS {r['qps']:.0f} vs {ref['qps']:.0f} "
                            f"({ratio(r['qps'], ref['qps']):.2f}x)")
                    out.append(row(kind="protocol", model=cfg.model, batching=b, workers=w, concurrency=c,
                                   protocol=http, unit="x",
                                   target=f"{http} p50 / {ref_name} p50 ({server_label(b, w)}, {c} client"
                                          f"{'s' if c > 1 else ''})",
                                   value=r["p50_ms"] / ref["p50_ms"], note=note))
    return out


def _http_targets(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    ref_name = http_reference(cfg.protocols)
    out = []
    for b in _batchings(rows):
        ref, r = _find(rows, b, 1, 1, ref_name or ""), _find(rows, b, 1, 1, "http")
        if not ref or not r or not ref["p50_ms"] or not r["p50_ms"]:
            continue
        value = r["p50_ms"] / ref["p50_ms"]
        out.append(row(kind="target", model=cfg.model, concurrency=1, batching=b, workers=1, protocol="http",
                       unit="x", target=f"HTTP binary p50 / {ref_name} p50 at one client ({server_label(b, 1)})",
                       value=value, threshold=HTTP_OVER_GRPC_TARGET, met=value <= HTTP_OVER_GRPC_TARGET,
                       note=f"p50 {r['p50_ms']:.3f} ms over HTTP binary vs {ref['p50_ms']:.3f} ms over {ref_name}"))
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


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _errors_text(by_code: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in by_code.items()) if by_code else "0"


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("batching", lambda r: r["batching"]),
    ("max batch", lambda r: "-" if r["max_batch"] is None else str(r["max_batch"])),
    ("clients", lambda r: str(r["concurrency"])),
    ("workers", lambda r: str(r["workers"])),
    ("protocol", lambda r: r["protocol"]),
    ("QPS", lambda r: "-" if r["qps"] is None else f"{r['qps']:.1f}"),
    ("p50 ms", lambda r: _ms(r["p50_ms"])),
    ("p95 ms", lambda r: _ms(r["p95_ms"])),
    ("p99 ms", lambda r: _ms(r["p99_ms"])),
    ("p99/p50", lambda r: "-" if r["tail_ratio"] is None else f"{r['tail_ratio']:.2f}"),
    ("errors", lambda r: _errors_text(r["errors_by_code"])),
    ("mean batch", lambda r: "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"),
    ("p50/raw", lambda r: "-" if r["overhead"] is None else f"{r['overhead']:.2f}x"),
    ("srv queue", lambda r: _ms(r["server_queue_p50_ms"])),
    ("srv infer", lambda r: _ms(r["server_inference_p50_ms"])),
    ("srv other", lambda r: _ms(r["server_other_p50_ms"])),
    ("net+client", lambda r: _ms(r["transport_p50_ms"])),
    ("serve cost", lambda r: _ms(r["serving_cost_p50_ms"])),
    ("-echo-raw", lambda r: "-" if r["echo_gap_ms"] is None else f"{r['echo_gap_ms']:.3f}"),
    ("infer busy", lambda r: "-" if r["inference_busy"] is None else f"{r['inference_busy']:.0%}"),
    ("cpu srv", lambda r: "-" if r["server_cpu"] is None else f"{r['server_cpu']:.2f}"),
    ("cpu cli", lambda r: "-" if r["client_cpu"] is None else f"{r['client_cpu']:.2f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    return text_table([name for name, _ in COLUMNS], [[fmt(r) for _, fmt in COLUMNS] for r in rows])


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def write_json(path: str, rows: list[dict[str, Any]]) -> None:
    """Every row as a JSON list, written atomically (:func:`zoo.fileio.atomic_write`)."""
    atomic_write(path, json.dumps([{k: _json_safe(v) for k, v in r.items()} for r in rows], indent=1))


def _cpu_per_row_text(raw: dict[str, Any]) -> str:
    """The model's CPU per row by batch size, and what a full batch saves over its rows alone."""
    per_row = raw.get("cpu_per_row_ms") or {}
    if not per_row:
        return ""
    text = "; CPU per row (all its threads): " + ", ".join(f"batch {b} {ms:.2f} ms"
                                                            for b, ms in sorted(per_row.items()))
    largest = max(per_row)
    if largest > 1 and 1 in per_row and per_row[1]:
        text += f" (batch {largest} costs {per_row[largest] / per_row[1]:.2f}x its rows run alone)"
    return text


def report(cfg: Config, model: Any, rows: list[dict[str, Any]], processes: int, info: dict[str, str]) -> str:
    """The terminal report: context, raw session.run, the table, its legend and the targets."""
    served = [r for r in rows if r["kind"] == "served"]
    raw = next(r for r in rows if r["kind"] == "raw")
    targets = [r for r in rows if r["kind"] == "target"]
    scaling = [r for r in rows if r["kind"] == "scaling"]
    echoes = [r for r in rows if r["kind"] == "echo"]
    echo = next((r for r in echoes if r["concurrency"] == 1), None)
    protocols = [r for r in rows if r["kind"] == "protocol"]
    peers = [r for r in rows if r["kind"] == "peer"]
    end_load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [
        f"{cfg.model} ({'x'.join(map(str, model.input_size))}), server onnxruntime threads {cfg.threads}"
        + (f" over {cfg.instances} model instances" if cfg.instances > 1 else "")
        + (" (split over a server's workers)" if max(cfg.workers) > 1 else "") + f", {processes} client processes"
        + (", a connection per client" if max(cfg.workers) > 1 else "")
        + f", {cfg.rounds} rounds, {cfg.duration_s:g} s measured per setting; "
        f"{info['cpu']}, {info['cores']} cores, loadavg {info.get('loadavg', '?')} at start, {end_load} at end",
        f"raw session.run at batch 1 ({cfg.threads} threads, this process, same inputs): p50 {raw['p50_ms']:.2f} ms, "
        f"p95 {raw['p95_ms']:.2f} ms over {raw['requests']} calls"
        + (f"; after {IDLE_GAP_S * 1e3:g} ms idle before each call: p50 {raw['raw_idle_p50_ms']:.2f} ms"
           if raw["raw_idle_p50_ms"] is not None else "") + _cpu_per_row_text(raw),
        f"bare gRPC echo (its own process, one client, the input's bytes in, {len(ECHO_REPLY)} bytes back): "
        + (f"p50 {echo['p50_ms']:.3f} ms, p99 {echo['p99_ms']:.3f} ms over {echo['requests']} calls"
           if echo and echo["p50_ms"] is not None else "no answer")
        + "".join(f"; at {r['concurrency']} clients {r['qps']:.0f} QPS, p50 {r['p50_ms']:.3f} ms"
                  + (f", {_server_cpu_ms_per_call(r):.2f} ms of its CPU per call"
                     if _server_cpu_ms_per_call(r) is not None else "")
                  for r in echoes if r["concurrency"] > 1 and r["qps"] and r["p50_ms"] is not None),
        format_table(served),
        "ms, client-observed; the parts are p50s of their own (they need not add up): srv queue = arrival to its "
        "batch's start (batching on: up to the batch timeout), srv infer = its batch's session.run, srv other = "
        "decode and reply, net+client = client latency - server total, serve cost = client latency - its own "
        "inference (what serving adds, robust to inference noise); infer busy = share of the window the "
        "model ran; cpu = cores used by the server and by all clients; -echo-raw = one client's p50 - (bare gRPC "
        "echo p50 + raw p50), what serving adds beyond transport and inference; the server's parts come "
        "with Classify's answers only (grpc)",
    ]
    split = [r for r in served if r["worker_connections"]]
    if split:  # what a --workers setting's tail depends on: the kernel hashes connections, not requests
        lines.append("connections held by each worker at each window's start (SO_REUSEPORT spreads connections, "
                     "not requests, over the workers):")
        lines += [f"  {server_label(r['batching'], r['workers'])}, {r['protocol']}, {r['concurrency']} clients: "
                  + ", ".join("?" if w is None else "+".join(map(str, w)) for w in r["worker_connections"])
                  for r in split]
    if targets:
        lines.append("targets (measured, not asserted):")
        for t in targets:
            sign = ">=" if t["target"].startswith("batching") else "<="
            unit, digits = (" ms", 3) if t["unit"] == "ms" else ("x", 2)
            lines.append(f"  {t['target']}: {t['value']:.{digits}f}{unit} (target {sign} {t['threshold']:g}{unit}): "
                         f"{'met' if t['met'] else 'MISSED'}")
            lines.append(f"    {'detail' if t['met'] else 'bound'}: {t['note']}")
    missing = unmeasured_targets(cfg)
    if missing:
        lines.append(f"targets not measured by this run's settings (the defaults measure all; --quick measures "
                     f"{','.join(map(str, QUICK_CONCURRENCY))} clients only):")
        lines += [f"  {m}" for m in missing]
    if protocols:
        lines.append("protocols, same server and setting (measured):")
        for t in protocols:
            lines.append(f"  {t['target']}: {t['value']:.2f}x; {t['note']}")
    if peers:
        lines.append("against the peer, same model file, clients and rounds (median of paired per-round ratios):")
        for t in peers:
            gaps = (f"; served p50 - (echo p50 + raw p50) {t['echo_gap_ms']:.3f} vs {t['peer_echo_gap_ms']:.3f} ms"
                    if t["echo_gap_ms"] is not None and t["peer_echo_gap_ms"] is not None else "")
            lines.append(f"  {t['target']}: QPS {_x(t['qps_ratio'])}, p50 {_x(t['p50_ratio'])}, "
                         f"p99 {_x(t['p99_ratio'])}{gaps}; {t['note']}")
            if t.get("cpu_note"):
                lines.append(f"    bound: {t['cpu_note']}")
    if scaling:
        lines.append("scale-out on this machine (measured):")
        for t in scaling:
            lines.append(f"  {t['target']}: {t['value']:.2f}x")
            lines.append(f"    detail: {t['note']}")
    failed = sum(r["errors"] for r in served + echoes)
    if failed:
        lines.append(f"{failed} requests failed or did not match their input (errors column)")
    return "\n".join(lines)
