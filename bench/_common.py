"""Measurement helpers shared by the benchmarks: interleaved timing, medians, page faults, threads.

This machine is shared and noisy (docs/benchmarking.md: medians of one configuration moved by up to
1.7x within two minutes), so every comparison here is measured in the same run with the
configurations interleaved in rounds, and only medians (and p90) are quoted.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

# glibc: larger blocks are mmap'ed and unmapped on every free, which costs PyTorch eager
# 50k-120k page faults per call at batch 8 (docs/benchmarking.md "Traps"). These are the values of
# MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ that removed most of it.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h


def pin_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for this process; returns what was done, in words.

    Same effect as starting the process with ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824`` (``mallopt`` also turns off the dynamic threshold, as
    the environment variables do). Process-wide and irreversible: a CLI's business, not a library's.
    """
    env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return f"not pinned (not glibc: {platform.libc_ver()[0] or platform.system()})"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "not pinned (mallopt failed)"
    given = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)
    return (f"pinned with mallopt: mmap threshold {MMAP_THRESHOLD}, trim threshold {TRIM_THRESHOLD}"
            + (f" (environment also had {given})" if given else ""))


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages touched: first-touch costs ~1.5 us each)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100] (numpy's default method)."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Samples:
    """Timed calls of one configuration: wall times (ms) and minor page faults per call."""

    times_ms: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        return percentile(self.times_ms, 90)

    @property
    def faults_per_call(self) -> float:
        return median(self.faults) if self.faults else math.nan


def time_call(fn: Callable[[], object], samples: Samples) -> float:
    f0 = minor_faults()
    t0 = time.perf_counter()
    fn()
    dt = (time.perf_counter() - t0) * 1e3
    samples.faults.append(minor_faults() - f0)
    samples.times_ms.append(dt)
    return dt


# A second warm-up call is skipped when the first one already took this long (seconds of a big
# model at batch 8 on a busy machine buy nothing).
WARMUP_BUDGET_MS = 1000.0
# A round should give a fast configuration enough calls that its median is not one noisy call,
# without letting it run longer than the slow ones (at most this many ms per round, 50 calls).
ROUND_TARGET_MS = 30.0
MAX_CALLS_PER_ROUND = 50


def interleaved(
    configs: dict[str, Callable[[], object]],
    runs: int,
    rounds: int,
    warmup: int = 2,
    progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
) -> dict[str, Samples]:
    """Time each configuration at least ``runs`` times, interleaved in ``rounds`` rounds.

    Every configuration is warmed up first (up to ``warmup`` calls, fewer once they have taken
    ``WARMUP_BUDGET_MS``; they also size its calls per round). Each round runs every configuration's
    calls back to back, in an order that rotates
    and reverses from round to round (A B C, C B A, B C A, ...), so that a burst of load from
    elsewhere falls on all configurations alike rather than on whichever ran last. Fast
    configurations get more calls per round (up to ``ROUND_TARGET_MS`` per round).
    """
    if runs < 1 or rounds < 1:
        raise ValueError(f"runs and rounds must be >= 1, got {runs} and {rounds}")
    rounds = min(rounds, runs)
    base = math.ceil(runs / rounds)
    per_round: dict[str, int] = {}
    for name, fn in configs.items():
        warm = Samples()
        for _ in range(max(1, warmup)):
            time_call(fn, warm)
            if sum(warm.times_ms) > WARMUP_BUDGET_MS:
                break
        est = min(warm.times_ms)
        per_round[name] = max(base, min(MAX_CALLS_PER_ROUND, int(ROUND_TARGET_MS // max(est, 1e-3))))
    out = {name: Samples() for name in configs}
    names = list(configs)
    steps = range(rounds) if progress is None else progress(range(rounds), rounds)
    for r in steps:
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order.reverse()
        for name in order:
            for _ in range(per_round[name]):
                time_call(configs[name], out[name])
    return out


def machine_info() -> dict[str, str]:
    """CPU model, SIMD flags, caches, cores and load average, read from the OS (Linux first)."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count())}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        flags = set(fields.get("flags", "").split())
        info["simd"] = ", ".join(f for f in ("avx512f", "avx2", "fma", "avx") if f in flags) or "no AVX"
    except OSError:
        pass
    for level, idx in (("L2", "index2"), ("L3", "index3")):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/{idx}/size", encoding="utf-8") as f:
                info[level] = f.read().strip()
        except OSError:
            pass
    try:
        info["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    info["nice"] = str(os.nice(0)) if hasattr(os, "nice") else "?"
    info["python"] = sys.version.split()[0]
    return info


def parse_size(text: str) -> int | None:
    """'36608K' / '32 MiB' / '1024' -> bytes; None when unreadable."""
    t = text.strip().upper().replace("IB", "").replace("B", "").replace(" ", "")
    mult = 1
    if t and t[-1] in "KMG":
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}[t[-1]]
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        return None


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse ``type`` for comma-separated values: ``--batch 1,8`` -> ``[1, 8]``."""
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value in {text!r}") from None
    return parse


# --------------------------------------------------------------------------- the export cache
# Random-weight exports shared by the benchmarks (bench.latency exports in its own process,
# bench.serve in a subprocess: it must not import torch), in the model repository layout
# python -m export.onnx writes, so that bench.serve serves the cache directory as it is.
EXPORT_CACHE = os.path.join("runs", "bench", "models")  # the default --cache; ignored by git
CACHE_VERSION = 1
# Metadata an export carries today beyond the required keys: an older export lacks it (the
# server's zoo_serve_model_flops series and bench.latency's FLOPs need it) and is exported again.
CURRENT_KEYS = ("flops",)
_CACHED = {"version": CACHE_VERSION, "source": "random-init", "precision": "fp32"}


def cached_export(cache: str, name: str) -> str:
    """Where ``name``'s random-weight export lives in ``cache``: ``CACHE/NAME/1/model.onnx``."""
    from contract.repository import model_file

    return model_file(os.path.join(cache, name), CACHE_VERSION)


def cache_problem(path: str, name: str) -> str | None:
    """Why the file at ``path`` is no current random-weight export of ``name``; None when it is."""
    from contract.metadata import read_metadata

    if not os.path.isfile(path):
        return "absent"
    try:
        meta = read_metadata(path)
    except Exception as e:  # whatever onnx or the metadata reader raises: the file cannot be served
        return f"unreadable ({type(e).__name__}: {e})"
    for key, want in dict(_CACHED, model=name).items():
        if meta.get(key) != want:
            return f"zoo.{key} is {meta.get(key)!r}, not {want!r}"
    missing = [key for key in CURRENT_KEYS if key not in meta]
    return f"exported before zoo.{', zoo.'.join(missing)} existed" if missing else None


def ensure_cached_export(cache: str, name: str, export_into: Callable[[str], None]) -> str:
    """``name``'s model.onnx in ``cache`` (:func:`cached_export`), exported first when it is absent
    or stale (:func:`cache_problem`).

    ``export_into(out)`` must write ``out/NAME/1/model.onnx`` (and ``out/NAME/labels.txt``), as
    ``python -m export.onnx NAME --out OUT --version 1`` does, and raise when it cannot. ``out`` is
    a fresh directory inside ``cache``; its files then replace the cached ones one by one, the
    model last, so a concurrent reader (another benchmark sharing the cache) sees an old file
    or a whole new one, never half of one.
    """
    path = cached_export(cache, name)
    if cache_problem(path, name) is None:
        return path
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".export-{name}-", dir=cache)
    try:
        export_into(tmp)
        fresh = cached_export(tmp, name)
        assert os.path.isfile(fresh), f"export_into wrote no {fresh}"
        src_root, dst_root = os.path.join(tmp, name), os.path.join(cache, name)
        files = [os.path.join(d, f) for d, _, names in os.walk(src_root) for f in names]
        for src in sorted(files, key=lambda f: f == fresh):
            dst = os.path.join(dst_root, os.path.relpath(src, src_root))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
