"""Why depthwise convolution runs slower than its FLOPs promise, measured.

    python -m bench.latency [--models a,b,...] [--batch 1,8] [--providers cpu[,cuda]] [--threads N]
                            [--runs N] [--json PATH] [--markdown PATH] [--plot PATH] [--quick]

For every model and batch: parameters, FLOPs (a multiply-add is 2 FLOPs), minimum bytes moved,
arithmetic intensity, onnxruntime latency (median, p90) of the exported, BatchNorm-folded ONNX
model, achieved GFLOP/s and share of the machine's peak, PyTorch eager latency of the same
folded model, and for each depthwise variant its FLOPs ratio against its dense twin next to its
latency ratio: ``gap = latency ratio / FLOPs ratio`` is how many times more each FLOP costs in
the depthwise net. Per operator class (onnxruntime profiling): time share, FLOPs, intensity and
GFLOP/s of depthwise, grouped, pointwise and dense convolutions, GEMMs and everything else. A
single-conv sweep over groups isolates the effect. The machine's ceilings (matmul GFLOP/s, copy
GB/s) are measured in the same run, before and after.

Timings are interleaved in rounds (every configuration of a batch in each round, order rotating)
and quoted as medians; nothing is asserted. Exported models are cached under ``--cache``
(random initialisation: weights do not change the time).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from bench import _common as common
from bench import roofline as rl
from bench.latency_report import Report
from contract.cli import HelpFormatter
from zoo.fileio import atomic_write

# Every default in one place.
DEFAULT_MODELS = ("resnext50_32x4d", "resnext50_dw", "densenet121", "densenet121_dw",
                  "resnext_mini", "resnext_mini_dw", "densenet_mini", "densenet_mini_dw")
QUICK_MODELS = ("resnext_mini", "resnext_mini_dw", "densenet_mini", "densenet_mini_dw")
DEFAULT_BATCHES = (1, 8)
DEFAULT_CACHE = common.EXPORT_CACHE
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Timed calls per configuration, at least: fast ones get more per round (bench._common.interleaved).
# 10 keeps the default run under ~8 minutes on a busy 2-core machine, where resnext50 and
# densenet121 at batch 8 take 1.5-5 s per call in PyTorch eager.
RUNS, QUICK_RUNS = 10, 2
ROUNDS, QUICK_ROUNDS = 5, 2  # interleaved rounds
WARMUP = 2  # untimed calls per configuration before the rounds (1 if the first took over 1 s)
PROFILE_RUNS, QUICK_PROFILE_RUNS = 3, 2  # profiled runs per model and batch (median per node)
PROFILE_WARMUP = 1  # profiled runs discarded first
PROFILE_MAX_RUNS, PROFILE_TARGET_MS = 20, 300.0  # fast models get more profiled runs, within this
# The textbook's single conv: 3x3, 256 -> 256 channels at 56x56 (ResNeXt-50's first stage width).
SWEEP = dict(channels=256, size=56, groups=(1, 4, 32, 64, 256))
QUICK_SWEEP = dict(channels=128, size=28, groups=(1, 4, 32, 128))
# docs/benchmarking.md's sizes; each ceiling is the best of >= 5 runs within >= 1.5 s (copies: half that).
CEILING_ARGS = dict(matmul_n=2048, copy_mib=512, cache_mib=8, reps=5, min_seconds=1.5)
QUICK_CEILING_ARGS = dict(matmul_n=1024, copy_mib=128, cache_mib=8, reps=3, min_seconds=0.2)  # 128 MiB: 3.5x L3
OPSET = 17

# Every JSON row has every key (None where it does not apply), so a list of rows loads as a table.
ROW_KEYS = (
    "kind", "name", "model", "twin", "batch", "provider", "threads", "op_class", "groups", "nodes",
    "params", "flops", "bytes", "intensity", "latency_ms", "latency_p90_ms", "runs", "gflops", "gbps",
    "peak_fraction", "roof_gflops", "roof_fraction", "time_share", "flop_share",
    "torch_latency_ms", "torch_p90_ms", "torch_gflops", "ort_over_torch", "faults_per_call",
    "torch_faults_per_call", "flops_ratio", "latency_ratio", "gap", "torch_latency_ratio", "torch_gap",
    "nchwc_nodes", "reorder_ms", "noise", "note",
)


class BenchError(Exception):
    """A failure that is not the user's argument: one line, exit 1."""


def row(**kw: Any) -> dict[str, Any]:
    unknown = set(kw) - set(ROW_KEYS)
    assert not unknown, unknown
    return {k: kw.get(k) for k in ROW_KEYS}


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    w = p.add_argument_group("what to measure")
    w.add_argument("--models", type=common.csv_list(str), default=None,
                   help=f"comma-separated registry names (default: {','.join(DEFAULT_MODELS)})")
    w.add_argument("--batch", type=common.csv_list(int), default=list(DEFAULT_BATCHES),
                   help="comma-separated batch sizes")
    w.add_argument("--providers", type=common.csv_list(str), default=["cpu"], help="onnxruntime providers: cpu, cuda")
    w.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    w.add_argument("--no-sweep", action="store_true", help="skip the single-conv groups sweep")
    w.add_argument("--quick", action="store_true",
                   help=f"mini models only, {QUICK_RUNS} runs, small sweep and ceilings (for tests)")
    h = p.add_argument_group("measurement")
    h.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads for onnxruntime and torch alike")
    h.add_argument("--runs", type=int, default=None, help=f"timed calls per configuration (default {RUNS}, "
                   f"quick {QUICK_RUNS})")
    h.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds (default {ROUNDS}, quick {QUICK_ROUNDS})")
    h.add_argument("--no-pin-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (page faults per call are recorded either way)")
    o = p.add_argument_group("output")
    o.add_argument("--cache", default=DEFAULT_CACHE, help="where exported models are kept and reused")
    o.add_argument("--json", metavar="PATH", help="every row as a JSON list")
    o.add_argument("--markdown", metavar="PATH", help="the report: tables and the explanation")
    o.add_argument("--plot", metavar="PATH", help="roofline PNG")
    o.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class Config:
    models: list[str]
    batches: list[int]
    providers: list[str]
    threads: int
    runs: int
    rounds: int
    profile_runs: int
    sweep: dict[str, Any] | None
    ceiling_args: dict[str, int]
    torch_eager: bool
    cache: str
    progress: bool
    argv: list[str]


def resolve_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> Config:
    """Validate everything before any work; a bad value is one parser error."""
    from zoo.registry import resolve_name

    models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    resolved = []
    for m in models:
        try:
            name = resolve_name(m)
        except ValueError as e:
            parser.error(f"--models: {e}")
        if name not in resolved:
            resolved.append(name)
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch: sizes must be >= 1, got {','.join(map(str, args.batch))}")
    batches = list(dict.fromkeys(args.batch))
    providers = list(dict.fromkeys(p.lower() for p in args.providers))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        parser.error(f"--providers: unknown {', '.join(bad)}; choose from {', '.join(PROVIDERS)}")
    if "cuda" in providers:
        import onnxruntime as ort
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            parser.error("--providers cuda: this onnxruntime has no CUDAExecutionProvider "
                         "(install the gpu extra: it replaces onnxruntime)")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else RUNS)
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else ROUNDS)
    if runs < 1 or rounds < 1:
        parser.error(f"--runs and --rounds must be >= 1, got {runs} and {rounds}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            try:  # fail now, not after minutes of measuring
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                parser.error(f"{flag} {path}: cannot create {parent}: {e.strerror or e}")
            if os.path.isdir(path) or not os.access(parent, os.W_OK):
                parser.error(f"{flag} {path}: not a writable file path")
    if os.path.exists(args.cache) and not os.path.isdir(args.cache):
        parser.error(f"--cache {args.cache}: exists and is not a directory")
    return Config(
        models=resolved, batches=batches, providers=providers, threads=args.threads, runs=runs, rounds=rounds,
        profile_runs=QUICK_PROFILE_RUNS if args.quick else PROFILE_RUNS,
        sweep=None if args.no_sweep else dict(QUICK_SWEEP if args.quick else SWEEP),
        ceiling_args=dict(QUICK_CEILING_ARGS if args.quick else CEILING_ARGS),
        torch_eager=not args.no_torch, cache=args.cache, progress=not args.no_progress, argv=list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    cfg = resolve_config(parser, args, argv)
    try:
        return run(cfg, args)
    except BenchError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- helpers


class Stages:
    """``[2/6] timing batch 8 ... done in 41.2s`` lines on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        t0 = time.perf_counter()
        print(f"[{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        print(f"[{self.done}/{self.total}] {what} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def _bar(enabled: bool, desc: str) -> Callable[[Iterable[int], int], Iterable[int]] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda it, total: tqdm(it, total=total, desc=desc, unit="round", file=sys.stderr, leave=False)


def ensure_exported(name: str, cache: str, threads: int) -> str:
    """``cache/NAME/1/model.onnx``, exported in this process by :func:`export.export` (folded,
    verified) when absent or stale (:func:`bench._common.ensure_cached_export`)."""
    def export_into(out: str) -> None:
        from export import ExportConfig, UserError, VerificationError, export
        from export.config import SilentReporter

        config = ExportConfig(model=name, out=out, version=common.CACHE_VERSION, latency_runs=0, progress_bars=False,
                              threads=threads, reporter=SilentReporter())
        try:
            export(config)
        except (UserError, VerificationError) as e:
            raise BenchError(f"export of {name} failed: {e}") from None

    return common.ensure_cached_export(cache, name, export_into)


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads (and one inter-op thread where still allowed); restore after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # allowed only before any inter-op work in the process
        torch.set_num_interop_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


@dataclass
class ModelData:
    name: str
    twin: str | None
    input_size: tuple[int, int, int]
    params: int
    flops1: int  # zoo.flops.count_flops at batch 1
    onnx_model: Any
    torch_model: Any
    graphs: dict[int, rl.GraphCost] = field(default_factory=dict)


# --------------------------------------------------------------------------- measurement


def _ort_session(source: Any, provider: str, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(source, rl.session_options(threads, profile_prefix), providers=[PROVIDERS[provider]])


def _torch_call(model: Any, x: Any, device: str) -> Callable[[], object]:
    import torch

    def call() -> object:
        with torch.inference_mode():
            y = model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return y
    return call


def _torch_device(provider: str) -> str | None:
    import torch

    if provider == "cpu":
        return "cpu"
    return "cuda" if provider == "cuda" and torch.cuda.is_available() else None


def profile_model(model_bytes: bytes, graph: rl.GraphCost, feeds: dict[str, np.ndarray], provider: str,
                  threads: int, runs: int) -> rl.ClassProfile:
    """Per-class kernel time per run of a fresh profiling session: median per node over at least
    ``runs`` runs (more for fast models, up to ``PROFILE_MAX_RUNS`` or ``PROFILE_TARGET_MS``)."""
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as work:
        sess = _ort_session(model_bytes, provider, threads, os.path.join(work, "ort"))
        t0 = time.perf_counter()
        for _ in range(PROFILE_WARMUP):
            sess.run(None, feeds)
        warm_ms = (time.perf_counter() - t0) * 1e3 / max(1, PROFILE_WARMUP)
        n = max(runs, min(PROFILE_MAX_RUNS, int(PROFILE_TARGET_MS // max(warm_ms, 1e-3))))
        for _ in range(n):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        del sess
        return rl.attribute_profile(rl.profile_runs(trace, skip_runs=PROFILE_WARMUP), graph)


def measure_models(cfg: Config, models: list[ModelData], provider: str, batch: int, peak: rl.Ceilings | None,
                   stage: Stages) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Model rows and op rows of one provider and batch: interleaved timing, then profiling."""
    import torch

    rng = np.random.default_rng(batch)
    sessions, feeds, configs = {}, {}, {}
    device = _torch_device(provider) if cfg.torch_eager else None
    with stage(f"timing {len(models)} models at batch {batch} on {provider} "
               f"({'onnxruntime + PyTorch eager' if device else 'onnxruntime'}, {cfg.rounds} rounds)"):
        for m in models:
            x = rng.standard_normal((batch, *m.input_size), dtype=np.float32)
            sess = _ort_session(m.onnx_model.SerializeToString(), provider, cfg.threads)
            feeds[m.name] = {sess.get_inputs()[0].name: x}
            sessions[m.name] = sess
            configs[f"ort:{m.name}"] = (lambda s=sess, f=feeds[m.name]: s.run(None, f))
            if device:
                tm = m.torch_model if device == "cpu" else copy.deepcopy(m.torch_model).to(device)
                configs[f"torch:{m.name}"] = _torch_call(tm, torch.from_numpy(x).to(device), device)
        samples = common.interleaved(configs, cfg.runs, cfg.rounds, WARMUP,
                                     _bar(cfg.progress, f"batch {batch} {provider}"))
    del configs
    profiles: dict[str, rl.ClassProfile] = {}
    with stage(f"profiling {len(models)} models at batch {batch} on {provider} ({cfg.profile_runs} runs each)"):
        for m in models:
            profiles[m.name] = profile_model(m.onnx_model.SerializeToString(), m.graphs[batch], feeds[m.name],
                                             provider, cfg.threads, cfg.profile_runs)
    sessions.clear()

    model_rows, op_rows = [], []
    cpu = provider == "cpu" and peak is not None
    for m in models:
        g = m.graphs[batch]
        flops = m.flops1 * batch
        o = samples[f"ort:{m.name}"]
        t = samples.get(f"torch:{m.name}")
        lat = o.median_ms
        gflops = flops / lat / 1e6
        intensity = flops / g.min_bytes
        roof = peak.roof(intensity) if cpu else None
        model_rows.append(row(
            kind="model", name=m.name, model=m.name, twin=m.twin, batch=batch, provider=provider, threads=cfg.threads,
            params=m.params, flops=flops, bytes=g.min_bytes, intensity=intensity, latency_ms=lat,
            latency_p90_ms=o.p90_ms, runs=len(o.times_ms), gflops=gflops, gbps=g.min_bytes / lat / 1e6,
            peak_fraction=gflops / peak.peak_gflops if cpu else None, roof_gflops=roof,
            roof_fraction=gflops / roof if roof else None, faults_per_call=o.faults_per_call,
            torch_latency_ms=t.median_ms if t else None, torch_p90_ms=t.p90_ms if t else None,
            torch_gflops=flops / t.median_ms / 1e6 if t else None,
            ort_over_torch=_ratio(lat, t.median_ms) if t else None,
            torch_faults_per_call=t.faults_per_call if t else None,
            note=(f"profile: {profiles[m.name].total_us / 1e3:.2f} ms of kernels per run, "
                  f"{profiles[m.name].unmapped_us / max(profiles[m.name].total_us, 1e-9):.1%} "
                  "unmapped (layout reorders)")))
        prof = profiles[m.name]
        all_flops = sum(prof.flops.values())
        for cls in rl.OP_CLASSES:
            us = prof.time_us.get(cls, 0.0)
            if prof.nodes[cls] == 0 and us == 0:
                continue
            cf, cb = prof.flops[cls], prof.bytes[cls]
            ms = us / 1e3
            cg = cf / ms / 1e6 if ms > 0 else None
            ci = cf / cb if cb else None
            croof = peak.roof(ci) if cpu and ci else None
            op_rows.append(row(
                kind="op", name=f"{m.name}:{cls}", model=m.name, twin=m.twin, batch=batch, provider=provider,
                threads=cfg.threads, op_class=cls, nodes=prof.nodes[cls], flops=cf, bytes=cb,
                intensity=ci, latency_ms=ms, runs=prof.runs, gflops=cg,
                gbps=cb / ms / 1e6 if ms > 0 else None,
                peak_fraction=cg / peak.peak_gflops if cpu and cg is not None else None, roof_gflops=croof,
                roof_fraction=cg / croof if croof and cg is not None else None,
                time_share=us / prof.total_us if prof.total_us else None,
                flop_share=cf / all_flops if all_flops else None,
                nchwc_nodes=prof.nchwc_convs(g, cls)[0] if cls in rl.CONV_CLASSES else None,
                reorder_ms=prof.reorder_us / 1e3 if cls == "other" else None,
                note=(f"{prof.reorder_us / 1e3:.3f} ms/run of it are NCHW<->NCHWc layout reorders"
                      if cls == "other" else
                      "{} of {} ran in onnxruntime's blocked NCHWc layout".format(*prof.nchwc_convs(g, cls))
                      if cls in rl.CONV_CLASSES else None)))
    return model_rows, op_rows


def twin_rows(model_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gap in one number for each depthwise model whose dense twin was measured alongside it."""
    out = []
    index = {(r["model"], r["batch"], r["provider"]): r for r in model_rows}
    for r in model_rows:
        if not r["twin"]:
            continue
        d = index.get((r["twin"], r["batch"], r["provider"]))
        if d is None:
            continue
        fr = r["flops"] / d["flops"]
        lr = r["latency_ms"] / d["latency_ms"]
        noise = max(x["latency_p90_ms"] / x["latency_ms"] for x in (r, d))
        tlr = _ratio(r["torch_latency_ms"], d["torch_latency_ms"])
        out.append(row(
            kind="twin", name=r["model"], model=r["model"], twin=r["twin"], batch=r["batch"], provider=r["provider"],
            threads=r["threads"], flops=r["flops"], bytes=r["bytes"], intensity=r["intensity"],
            latency_ms=r["latency_ms"], gflops=r["gflops"], peak_fraction=r["peak_fraction"],
            flops_ratio=fr, latency_ratio=lr, gap=lr / fr, torch_latency_ratio=tlr, noise=noise,
            torch_gap=tlr / fr if tlr is not None else None,
            note=f"{r['model']} does {fr:.0%} of {r['twin']}'s FLOPs in {lr:.0%} of its time"))
    return out


def measure_sweep(cfg: Config, provider: str, batch: int, peak: rl.Ceilings | None,
                  stage: Stages) -> list[dict[str, Any]]:
    """One 3x3 conv, C -> C channels at SxS, for each group count: onnxruntime and PyTorch eager."""
    import torch
    from export.convert import export_model

    sw = cfg.sweep
    assert sw is not None
    c, s = sw["channels"], sw["size"]
    device = _torch_device(provider) if cfg.torch_eager else None
    x = np.random.default_rng(0).standard_normal((batch, c, s, s), dtype=np.float32)
    configs: dict[str, Callable[[], object]] = {}
    graphs: dict[int, rl.GraphCost] = {}
    protos: dict[int, bytes] = {}
    feeds: dict[int, dict[str, np.ndarray]] = {}
    sessions = {}
    with stage(f"sweep: 3x3 conv {c}->{c} at {s}x{s}, batch {batch}, groups {','.join(map(str, sw['groups']))}"):
        torch.manual_seed(0)
        for g in sw["groups"]:
            conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False).eval()
            proto = export_model(conv, (c, s, s), OPSET, "torchscript")
            graphs[g] = rl.analyze_onnx(proto, batch)
            protos[g] = proto.SerializeToString()
            sess = _ort_session(protos[g], provider, cfg.threads)
            sessions[g] = sess
            feeds[g] = {sess.get_inputs()[0].name: x}
            configs[f"ort:{g}"] = (lambda se=sess, f=feeds[g]: se.run(None, f))
            if device:
                configs[f"torch:{g}"] = _torch_call(conv.to(device), torch.from_numpy(x).to(device), device)
        samples = common.interleaved(configs, cfg.runs, cfg.rounds, WARMUP, _bar(cfg.progress, f"sweep batch {batch}"))
        sessions.clear()
        layouts = {}
        for g in sw["groups"]:  # which layout onnxruntime picked: one short profile each
            prof = profile_model(protos[g], graphs[g], feeds[g], provider, cfg.threads, 1)
            layouts[g] = prof.nchwc_convs(graphs[g], graphs[g].ops[0].op_class)[0]
    cpu = provider == "cpu" and peak is not None
    rows = []
    base = None
    for g in sw["groups"]:
        (op,) = graphs[g].ops
        o, t = samples[f"ort:{g}"], samples.get(f"torch:{g}")
        lat = o.median_ms
        gflops = op.flops / lat / 1e6
        roof = peak.roof(op.intensity) if cpu else None
        r = row(kind="sweep", name=f"conv3x3 {c}->{c} {s}x{s} g{g}", batch=batch, provider=provider,
                threads=cfg.threads, op_class=op.op_class, groups=g, nodes=1, params=c * (c // g) * 9,
                flops=op.flops, bytes=op.bytes, intensity=op.intensity, latency_ms=lat, latency_p90_ms=o.p90_ms,
                runs=len(o.times_ms), gflops=gflops, gbps=op.bytes / lat / 1e6,
                peak_fraction=gflops / peak.peak_gflops if cpu else None, roof_gflops=roof,
                roof_fraction=gflops / roof if roof else None, faults_per_call=o.faults_per_call,
                torch_latency_ms=t.median_ms if t else None, torch_p90_ms=t.p90_ms if t else None,
                torch_gflops=op.flops / t.median_ms / 1e6 if t else None,
                ort_over_torch=_ratio(lat, t.median_ms) if t else None,
                torch_faults_per_call=t.faults_per_call if t else None, nchwc_nodes=layouts[g],
                note=(f"im2col GEMM per group: M={c // g} (out channels), K={c // g * 9}, "
                      f"N={batch * s * s}; {g} of them"))
        if base is None:
            base = r
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["latency_ratio"] = lat / base["latency_ms"]
        r["gap"] = r["latency_ratio"] / r["flops_ratio"]
        r["torch_latency_ratio"] = _ratio(r["torch_latency_ms"], base["torch_latency_ms"])
        r["torch_gap"] = r["torch_latency_ratio"] / r["flops_ratio"] if r["torch_latency_ratio"] else None
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- run


def run(cfg: Config, args: argparse.Namespace) -> int:
    import onnx
    import onnxruntime as ort
    import torch
    from zoo.flops import count_flops
    from zoo.nn import fold_batchnorm
    from zoo.registry import count_params, create_model, get_model_spec

    started = _dt.datetime.now(_dt.timezone.utc)
    machine = common.machine_info()
    malloc = ("not pinned (--no-pin-malloc); page faults per call recorded" if args.no_pin_malloc
              else common.pin_malloc())
    total_stages = 3 + len(cfg.providers) * len(cfg.batches) * (2 + (1 if cfg.sweep else 0))
    stage = Stages(total_stages)
    env = {
        "command": "python -m bench.latency" + (" " + shlex.join(cfg.argv) if cfg.argv else ""),
        "started": started.isoformat(timespec="seconds"),
        "versions": f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
                    f"numpy {np.__version__}, python {machine.get('python')}",
        "threads": f"onnxruntime intra_op={cfg.threads} inter_op=1 (sequential, spinning on: its default); "
                   f"torch intra_op={cfg.threads} inter_op=%s",
        "malloc": malloc,
        "machine": f"{machine.get('cpu')}, {machine.get('cores')} cores, SIMD {machine.get('simd', '?')}, "
                   f"L2 {machine.get('L2', '?')}/core, L3 {machine.get('L3', '?')}",
        "load_start": machine.get("loadavg", "?"),
        "nice": machine.get("nice", "?"),
        "timing": f"{cfg.runs}+ timed calls per configuration (more for fast ones, up to "
                  f"{common.ROUND_TARGET_MS:.0f} ms per round) in {cfg.rounds} interleaved rounds whose order rotates, "
                  f"after {WARMUP} warm-up calls (1 when the first took over {common.WARMUP_BUDGET_MS / 1e3:.0f} s); "
                  "median and p90; onnxruntime profiles: median per node of "
                  f"{cfg.profile_runs}-{PROFILE_MAX_RUNS} runs "
                  f"after {PROFILE_WARMUP} warm-up",
        "note": args.note,
        "threads_n": str(cfg.threads),
        "machine_info": machine,
    }
    rows: list[dict[str, Any]] = []
    with torch_threads(cfg.threads):
        env["threads"] = env["threads"] % torch.get_num_interop_threads()
        print(f"bench.latency: {env['versions']}", flush=True)
        print(f"threads: {env['threads']}", flush=True)
        print(f"malloc: {malloc}", flush=True)
        print(f"machine: {env['machine']}; load average {env['load_start']}; nice {env['nice']}", flush=True)

        with stage("machine ceilings (before)"):
            before = rl.measure_ceilings(cfg.threads, tag="before", **cfg.ceiling_args)

        models: list[ModelData] = []
        with stage(f"export/load {len(cfg.models)} models (cache {cfg.cache})"):
            for name in cfg.models:
                spec = get_model_spec(name)
                path = ensure_exported(name, cfg.cache, cfg.threads)
                proto = onnx.load(path)
                torch.manual_seed(0)
                model = create_model(name).eval()
                flops1 = count_flops(model, spec.input_size, 1)
                md = ModelData(name, spec.dense_twin, tuple(spec.input_size), count_params(model), flops1, proto,
                               fold_batchnorm(model))
                for b in cfg.batches:
                    md.graphs[b] = rl.analyze_onnx(proto, b)
                    if md.graphs[b].conv_gemm_flops != flops1 * b:
                        print(f"warning: {name}: ONNX conv+GEMM FLOPs {md.graphs[b].conv_gemm_flops:,} differ from "
                              f"zoo.flops {flops1 * b:,} at batch {b}", file=sys.stderr)
                models.append(md)
            for md in models:
                if md.twin and md.twin not in cfg.models:
                    print(f"note: {md.name}'s dense twin {md.twin} is not in --models: no gap for it", file=sys.stderr)

        model_rows, op_rows, sweep_rows = [], [], []
        for provider in cfg.providers:
            for b in cfg.batches:
                mr, orows = measure_models(cfg, models, provider, b, before, stage)
                model_rows += mr
                op_rows += orows
                if cfg.sweep:
                    sweep_rows += measure_sweep(cfg, provider, b, before, stage)

        with stage("machine ceilings (after)"):
            after = rl.measure_ceilings(cfg.threads, tag="after", **cfg.ceiling_args)
    env["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    env["elapsed_s"] = f"{(_dt.datetime.now(_dt.timezone.utc) - started).total_seconds():.0f}"

    ceil = rl.Ceilings.best(before, after)
    _rescale(model_rows + op_rows + sweep_rows, ceil)  # fractions against the better of before and after
    env["cpu_obtained"] = (f"{before.cpu_cores:.2f} before, {after.cpu_cores:.2f} after"
                           if before.cpu_cores and after.cpu_cores else "?")
    rows.append(row(kind="env", name="run", threads=cfg.threads, note=json.dumps(env)))
    for k, v in ceil.detail.items():
        rows.append(row(kind="ceiling", name=k, threads=cfg.threads, gflops=v if "GFLOP/s" in k else None,
                        gbps=v if "GB/s" in k else None, note=None if "/s" in k else f"{v:.2f}"))
    rows.append(row(kind="ceiling", name="peak (best matmul)", gflops=ceil.peak_gflops, threads=cfg.threads))
    rows.append(row(kind="ceiling", name="bandwidth (best copy)", gbps=ceil.bandwidth_gbps, threads=cfg.threads))
    rows.append(row(kind="ceiling", name="ridge point", intensity=ceil.ridge, threads=cfg.threads,
                    note="FLOP/byte where the memory roof meets the compute roof"))
    twins = twin_rows(model_rows)
    rows += model_rows + twins + op_rows + sweep_rows

    report = Report(env, ceil, model_rows, twins, op_rows, sweep_rows, machine, plot_path=args.plot,
                    markdown_path=args.markdown)
    print()
    print(report.terminal())
    if args.json:
        atomic_write(args.json, json.dumps([_clean(r) for r in rows], indent=1) + "\n")
    if args.plot:
        rl.plot_roofline(args.plot, ceil, report.points(),
                         f"Roofline, {machine.get('cpu')}, {cfg.threads} threads, fp32 "
                         f"(onnxruntime {ort.__version__})")
    if args.markdown:
        atomic_write(args.markdown, report.markdown())
    written = [p for p in (args.json, args.markdown, args.plot) if p]
    print(f"\nwritten: {', '.join(written)}" if written else "", flush=True)
    return 0


def _rescale(rows: list[dict[str, Any]], ceil: rl.Ceilings) -> None:
    for r in rows:
        if r["provider"] != "cpu" or r["gflops"] is None:
            continue
        r["peak_fraction"] = r["gflops"] / ceil.peak_gflops
        if r["intensity"]:
            r["roof_gflops"] = ceil.roof(r["intensity"])
            r["roof_fraction"] = r["gflops"] / r["roof_gflops"]


def _clean(r: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in r.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
