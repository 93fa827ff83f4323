"""What an export is asked to do (:class:`ExportConfig`) and what it did (:class:`ExportResult`).

Every default, tolerance and gate of the export lives here, as a field a caller can set: the
CLI (:mod:`export.onnx`) builds an :class:`ExportConfig` from its flags, ``bench`` and the tests
build one directly and call :func:`export.export`.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_OUT = "models"  # ignored by git
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo's translation table starts at opset 18
MAX_OPSET = {"torchscript": 20, "dynamo": 23}
MIN_OPSET = 13  # Conv/Gemm/InstanceNormalization/QDQ per-channel all need >= 13
EXPORTERS = ("torchscript", "dynamo")
CALIB_METHODS = ("minmax", "percentile", "entropy")
# fp32 must reproduce eager PyTorch to this max |diff| / max |logit| (docs/benchmarking.md: an
# absolute tolerance passes trivially on random-init logits of ~1e-9).
FP32_RTOL = 1e-4
# fp16 on random inputs (no val set to judge top-1 by): a loose relative bound that still
# catches a broken conversion.
FP16_RTOL = 2e-2
# fp16 and int8 must pick the same top-1 class as fp32 eager on at least this share of val images.
LOWP_MIN_AGREEMENT = 0.99
# ... except for random-init weights, whose near-tied logits make top-1 a coin toss: their
# fp16/int8 val logits must stay within this share of the logit scale instead.
LOWP_RANDOM_INIT_RTOL = 0.25
RANDOM_SAMPLES = 4  # random N(0, 1) inputs checked in every export
VAL_SAMPLES = 500  # val images checked at most (deterministic subset)
CALIB_SAMPLES = 128  # train images int8 calibration sees
CALIB_BATCH = 16
# --int8-exclude: "auto" keeps fp32 for the grouped convs whose int8 form measured slower in the
# export itself, "none" quantizes everything, otherwise comma-separated ONNX op types kept fp32.
INT8_EXCLUDE = "auto"
INT8_TIMING_ROUNDS = 9  # auto: interleaved batch-1 rounds per variant, the fastest counts (after 2 warm-ups)
EVAL_BATCH = 32
LATENCY_RUNS = 20  # onnxruntime batch-1 runs for the median (after 3 warm-up runs)
TRITON_MAX_BATCH = 32
TRITON_QUEUE_DELAY_US = 500


class UserError(Exception):
    """Bad input: reported as one line, exit 2, nothing written."""


class VerificationError(Exception):
    """onnxruntime does not reproduce PyTorch: exit 1, no model.onnx left behind.

    ``summary`` is the export's summary table, the parity rows that failed included."""

    def __init__(self, message: str, summary: str = "") -> None:
        super().__init__(message)
        self.summary = summary


class Reporter(Protocol):
    """Where an export tells what it is doing: each step once, when it ends, and warnings."""

    def step(self, index: int, total: int, what: str, seconds: float, detail: str) -> None: ...

    def warning(self, text: str) -> None: ...


class StderrReporter:
    """``[3/8] export (torchscript, opset 17, dynamic batch) 1.2s`` lines and warnings on stderr."""

    def step(self, index: int, total: int, what: str, seconds: float, detail: str) -> None:
        extra = f": {detail}" if detail else ""
        print(f"[{index}/{total}] {what} {seconds:.1f}s{extra}", file=sys.stderr, flush=True)

    def warning(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class SilentReporter:
    """Says nothing: for callers that read the :class:`ExportResult` instead."""

    def step(self, index: int, total: int, what: str, seconds: float, detail: str) -> None:
        pass

    def warning(self, text: str) -> None:
        pass


# (model path, threads) -> an object with onnxruntime's ``run(output_names, feeds)``
SessionFactory = Callable[[str, int], Any]


@dataclass(frozen=True)
class ExportConfig:
    """One export. ``model`` or ``checkpoint`` names what to export; the rest has defaults.

    The fields mirror ``python -m export.onnx``'s flags (``fold`` is ``not --no-fold``,
    ``progress_bars`` is ``not --no-progress``); the tolerances and the session factory have no
    flag: they are there for callers that check the gates themselves.
    """

    model: str | None = None
    checkpoint: str | None = None
    ema: bool | None = None  # a checkpoint's weights: None its selected ones, True the EMA's, False the raw ones
    torchvision_weights: str | None = None
    norm: str | None = None
    num_classes: int | None = None
    labels: str | None = None  # a file, one label per line
    out: str = DEFAULT_OUT
    name: str | None = None
    version: int | None = None
    triton: bool = False
    max_batch_size: int = TRITON_MAX_BATCH
    opset: int | None = None
    exporter: str = "torchscript"
    input_size: tuple[int, int] | None = None
    fold: bool = True
    precision: str = "fp32"
    calib_data: str | None = None
    calib_samples: int = CALIB_SAMPLES
    calib_method: str = "minmax"
    int8_exclude: str = INT8_EXCLUDE
    val_samples: int = VAL_SAMPLES
    latency_runs: int = LATENCY_RUNS
    threads: int = 0
    progress_bars: bool = True
    # gates
    fp32_rtol: float = FP32_RTOL
    fp16_rtol: float = FP16_RTOL
    lowp_min_agreement: float = LOWP_MIN_AGREEMENT
    lowp_random_init_rtol: float = LOWP_RANDOM_INIT_RTOL
    # collaborators
    session_factory: SessionFactory | None = None  # None: export.verify.ort_session (CPU)
    reporter: Reporter = field(default_factory=StderrReporter)

    @property
    def resolved_opset(self) -> int:
        return self.opset or DEFAULT_OPSET[self.exporter]


@dataclass(frozen=True)
class ExportResult:
    """A committed export: where it went and what verification measured."""

    path: str  # OUT/NAME/VERSION/model.onnx
    model_dir: str
    version: int
    precision: str
    written: tuple[str, ...]  # model.onnx, labels.txt and, with triton, config.pbtxt
    parities: tuple[Any, ...]  # export.verify.Parity, random inputs first
    latency_ms: float | None
    file_bytes: int
    summary: str  # the table the CLI prints
    int8: Any = None  # export.convert.Int8Choice for an int8 export
    audit: Any = None  # export.verify.GraphAudit: the graph onnxruntime runs after its optimisations

    def to_json(self) -> dict[str, Any]:
        """What ``python -m export.onnx --json`` writes: plain JSON types only."""
        from dataclasses import asdict

        return dict(path=self.path, model_dir=self.model_dir, version=self.version, precision=self.precision,
                    written=list(self.written), parities=[asdict(p) for p in self.parities],
                    latency_ms=self.latency_ms, file_bytes=self.file_bytes,
                    int8=self.int8.as_dict() if self.int8 is not None else None,
                    audit=self.audit.as_dict() if self.audit is not None else None)
