"""``export(config) -> ExportResult``: plan, convert, claim a version, stamp, verify, commit.

The order is what makes a ``model.onnx`` trustworthy: every argument is checked before anything
is written; the version directory is claimed before the metadata is stamped (so it is stamped
once, with the version it lands in); the model is verified by onnxruntime under a temporary
name and renamed to ``model.onnx`` only when it passed; a failure removes everything it created.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from contract import repository as layout
from contract.metadata import encode_metadata
from export import convert, verify
from export.config import (
    CALIB_BATCH,
    EVAL_BATCH,
    INT8_TIMING_ROUNDS,
    RANDOM_SAMPLES,
    TRITON_QUEUE_DELAY_US,
    ExportConfig,
    ExportResult,
    Reporter,
    UserError,
    VerificationError,
)
from export.plan import (
    OutputDir,
    check_config,
    check_same_model,
    check_writable,
    load_data,
    plan_version,
    resolve_plan,
)


class Steps:
    """Numbers the steps and reports each once, when it ends, with its duration."""

    def __init__(self, total: int, reporter: Reporter) -> None:
        self.total, self.reporter, self.done = total, reporter, 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[dict[str, str]]:
        self.done += 1
        note: dict[str, str] = {}
        t0 = time.perf_counter()
        yield note
        self.reporter.step(self.done, self.total, what, time.perf_counter() - t0, note.get("msg", ""))


def summary_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def export(config: ExportConfig) -> ExportResult:
    """Export, verify and commit one model as ``config`` says.

    Raises :class:`UserError` (bad input, nothing written) or :class:`VerificationError`
    (onnxruntime does not reproduce PyTorch; nothing left behind).
    """
    check_config(config)
    import importlib.util
    if importlib.util.find_spec("onnxruntime") is None:  # verification runs it; it comes from an extra
        raise UserError("onnxruntime is not installed: pip install -e '.[cpu]' (or '.[gpu]' for onnxruntime-gpu)")
    with _torch_threads(config.threads):
        return _export(config)


def _export(config: ExportConfig) -> ExportResult:
    check_writable(config.out)
    plan = resolve_plan(config)
    model_dir = os.path.join(config.out, plan.dir_name)
    check_same_model(model_dir, plan.labels, plan.input_size)
    version = plan_version(model_dir, config.version)
    bundle = load_data(plan, config)
    opset = config.resolved_opset
    precision = config.precision
    reporter = config.reporter
    session_factory = config.session_factory or verify.ort_session
    import onnx
    import torch

    from zoo.flops import count_flops
    from zoo.nn import fold_batchnorm
    from zoo.registry import count_params

    if plan.source == "random-init":
        reporter.warning("WARNING: no --checkpoint or --torchvision-weights: exporting RANDOM initialisation "
                         "(its predictions are meaningless; fine for benchmarks)")
    steps = Steps(8 if precision == "fp32" else 9, reporter)
    model, c = plan.model, plan.input_size

    with steps.step(f"build {plan.name} (norm={plan.norm}, {len(plan.labels)} classes, input {list(c)})") as note:
        try:
            with torch.no_grad():
                model(torch.zeros(1, *c))
        except RuntimeError as e:
            raise UserError(f"{plan.name} cannot run at input size {list(c)}: {str(e).splitlines()[0]}") from None
        params, flops = count_params(model), count_flops(model, c)
        note["msg"] = f"{params:,} parameters, {flops / 1e9:.3f} GFLOPs"

    bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with steps.step("fold BatchNorm") as note:
        if not config.fold:
            to_export, folded = model, False
            note["msg"] = "skipped (--no-fold)"
        elif bn_modules == 0:
            to_export, folded = model, False
            note["msg"] = (f"nothing to fold: {plan.norm} normalizes with the statistics of each input "
                           "at test time, so it stays in the graph")
        else:
            to_export, folded = fold_batchnorm(model), True
            note["msg"] = f"{bn_modules} BatchNorm2d folded into convs or scale/shift"

    with steps.step(f"export ({config.exporter}, opset {opset}, dynamic batch)"):
        onnx_model = convert.export_model(to_export, c, opset, config.exporter)
    with steps.step("onnx.checker full check"):
        onnx.checker.check_model(onnx_model, full_check=True)
    with steps.step("shape inference") as note:
        onnx_model = convert.check_graph(onnx_model, c, len(plan.labels))
        bn_nodes = convert.count_batchnorm_with_statistics(onnx_model)
        scale_shift = convert.count_ops(onnx_model, "BatchNormalization") - bn_nodes
        note["msg"] = f"input [batch, {', '.join(map(str, c))}] -> logits [batch, {len(plan.labels)}], " \
                      f"{len(onnx_model.graph.node)} nodes, {bn_nodes} BatchNormalization" \
                      + (f" (+ {scale_shift} folded to scale/shift)" if scale_shift else "")

    renorm = verify.renormalizer(bundle, plan.mean, plan.std) if bundle is not None else None
    int8 = None
    if precision == "fp16":
        reporter.warning(convert.FP16_CPU_NOTE)
        with steps.step("convert to fp16 (fp32 input/output)"):
            onnx_model = convert.to_fp16(onnx_model)
            onnx.checker.check_model(onnx_model, full_check=True)
    elif precision == "int8":
        idx = verify.subset(len(bundle.train), config.calib_samples, seed=1)
        with steps.step(f"quantize int8 ({config.calib_method}, {len(idx)} calibration images)") as note:
            calib = (x for x, _ in verify.dataset_batches(bundle.train, idx, CALIB_BATCH, renorm, False))
            with tempfile.TemporaryDirectory(prefix="export-int8-") as work:
                onnx_model, int8 = convert.to_int8(onnx_model, calib, config.calib_method, work, config.int8_exclude,
                                                   config.threads, INT8_TIMING_ROUNDS)
            note["msg"] = int8.describe()

    out = OutputDir(config.out, plan.dir_name, version, explicit=config.version is not None)
    try:
        with steps.step("write temporary model file") as note:
            version = out.claim()
            data = _stamped(onnx_model, plan, config, version, folded, torch.__version__, flops, int8)
            tmp = out.write(data)
            note["msg"] = f"{_size(len(data))} in {out.version_dir}"

        parities: list[verify.Parity] = []
        with steps.step("verify onnxruntime (CPU) against PyTorch eager (unfolded)") as note:
            session = session_factory(tmp, config.threads)
            progress = config.progress_bars
            parities.append(verify.run_pair(model, session, verify.random_batches(c), "random", RANDOM_SAMPLES,
                                            progress, config.fp32_rtol))
            if bundle is not None and config.val_samples > 0:
                idx = verify.subset(len(bundle.val), config.val_samples)
                batches = verify.dataset_batches(bundle.val, idx, EVAL_BATCH, renorm, plan.data_is_training_set)
                parities.append(verify.run_pair(model, session, batches, "val", len(idx), progress,
                                                config.fp32_rtol))
            failures = verify.gate(parities, config, random_init=plan.source == "random-init")
            note["msg"] = "FAILED" if failures else "passed"
        latency = verify.median_latency_ms(session, c, config.latency_runs) if not failures else None
        audit = verify.optimized_graph_audit(tmp, config.threads)

        bn_note = f"{bn_nodes}"
        if folded:
            bn_note += f" (folded {bn_modules} BatchNorm2d" + (
                f"; {scale_shift} with no conv before them run as scale/shift nodes)" if scale_shift else ")")
        elif bn_modules:
            bn_note += f" (not folded: {bn_modules} BatchNorm2d in the model; the exporter fuses Conv->BN itself)"
        rows = [
            ("model", f"{plan.name} (norm={plan.norm}, {len(plan.labels)} classes, input {list(c)})"),
            ("weights", plan.source),
            ("parameters", f"{params:,}"),
            ("GFLOPs (bs1)", f"{flops / 1e9:.3f}"),
            ("precision", precision + ("" if precision == "fp32" else " (fp32 input/output)")),
            ("file size", _size(len(data))),
            ("BatchNormalization nodes", bn_note),
            ("opset / exporter", f"{opset} / {config.exporter}"),
            *([("int8", int8.describe())] if int8 is not None else []),
            ("onnxruntime graph", audit.describe()),
        ]
        for p in parities:
            rows.append((f"parity {p.what} ({p.count})", p.describe(precision)))
        if plan.source == "random-init" and precision != "fp32" and len(parities) > 1:
            rows.append(("note", (f"random-init weights: {precision} val top-1 agreement is reported, not "
                                  f"gated (near-tied logits); max|diff|/scale <= {config.lowp_random_init_rtol} is")))
        rows.append(("onnxruntime latency bs1", f"{latency:.2f} ms median of {config.latency_runs}"
                     if latency is not None else "not measured"))
        title = f"export {plan.dir_name} v{version} ({precision})"
        if failures:
            rows.append(("result", "VERIFICATION FAILED, nothing written"))
            raise VerificationError("; ".join(failures), summary_table(rows, title))

        with steps.step("commit model repository") as note:
            del session
            written = [out.commit(), *_write_shared_files(out.model_dir, plan, config)]
            note["msg"] = ", ".join(written)
    except BaseException:
        out.rollback()
        raise

    rows.append(("written", written[0]))
    return ExportResult(path=written[0], model_dir=out.model_dir, version=version, precision=precision,
                        written=tuple(written), parities=tuple(parities), latency_ms=latency, file_bytes=len(data),
                        summary=summary_table(rows, title), int8=int8, audit=audit)


def _stamped(onnx_model: Any, plan: Any, config: ExportConfig, version: int, folded: bool,
             torch_version: str, flops: int, int8: Any = None) -> bytes:
    """The serialized model with its metadata (:mod:`contract.metadata`) for ``version``;
    ``flops`` is zoo.flops.count_flops at batch 1 and the exported input size."""
    from zoo.registry import get_model_spec

    twin = get_model_spec(plan.name).dense_twin
    meta = encode_metadata(
        model=plan.name, version=version, labels=plan.labels, input_size=list(plan.input_size), mean=plan.mean,
        std=plan.std, norm=plan.norm, folded=folded, precision=config.precision, source=plan.source,
        crop_pct=plan.crop_pct, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        opset=config.resolved_opset, exporter=f"torch {torch_version.split('+')[0]} {config.exporter}",
        flops=flops, **({"dense_twin": twin} if twin else {}), **plan.extra_meta,
        **({"int8": json.dumps(int8.as_dict())} if int8 is not None else {}))
    del onnx_model.metadata_props[:]
    for key, value in meta.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx_model.model_version = version
    onnx_model.doc_string = f"{plan.name} ({plan.norm}, {config.precision}) exported by zoo export.onnx"
    return onnx_model.SerializeToString()


def _write_shared_files(model_dir: str, plan: Any, config: ExportConfig) -> list[str]:
    """labels.txt and, with ``triton``, config.pbtxt: shared by every version of the model."""
    from zoo.fileio import atomic_write

    labels_path = os.path.join(model_dir, layout.LABELS_FILE)
    labels_text = layout.labels_text(plan.labels).encode()
    if os.path.exists(labels_path):
        with open(labels_path, "rb") as f:
            if f.read() != labels_text:
                config.reporter.warning(f"warning: replacing {labels_path}: its labels differ from this export's "
                                        "(Triton reads one labels file for every version)")
    atomic_write(labels_path, labels_text)
    written = [labels_path]
    if config.triton:
        config_path = os.path.join(model_dir, layout.CONFIG_FILE)
        triton = layout.triton_config(plan.dir_name, plan.input_size, len(plan.labels), config.max_batch_size,
                                      TRITON_QUEUE_DELAY_US)
        atomic_write(config_path, layout.config_text(triton))
        written.append(config_path)
    return written
