"""Export a zoo model to ONNX: fold BatchNorm, export, check, verify parity, write metadata.

    python -m export.onnx resnext50 --checkpoint runs/train/best.pt --out models --triton
    python -m export.onnx resnext50 --torchvision-weights resnext50_32x4d-1a0047aa.pth
    python -m export.onnx resnext_mini --checkpoint best.pt --precision int8

Writes a Triton-style model repository::

    OUT/NAME/VERSION/model.onnx     input "input" [N, C, H, W] float32 -> "logits" [N, classes] float32
    OUT/NAME/labels.txt             one class label per line, index order
    OUT/NAME/config.pbtxt           with --triton (platform onnxruntime_onnx, dynamic batching)

The model file is written to a temporary name in the version directory and renamed only after
onnxruntime reproduces PyTorch (the *unfolded* eager model) within tolerance, so a file called
``model.onnx`` has always passed verification. A new version joins an existing OUT/NAME only with
the same labels and input size (labels.txt and config.pbtxt are shared by every version): otherwise
the export is refused before anything is written. The metadata keys are documented in
:mod:`contract.metadata`. ``--json PATH`` also writes the result (parities, latency, the int8
choices and the audit of the graph onnxruntime runs) as JSON.
Exit status: 0 exported, 1 verification failed, 2 bad input.
The steps themselves are the library :func:`export.export`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from contract.cli import HelpFormatter
from contract.metadata import PRECISIONS
from export.config import (
    CALIB_METHODS,
    CALIB_SAMPLES,
    DEFAULT_OPSET,
    DEFAULT_OUT,
    EXPORTERS,
    INT8_EXCLUDE,
    LATENCY_RUNS,
    TRITON_MAX_BATCH,
    VAL_SAMPLES,
    ExportConfig,
    UserError,
    VerificationError,
)

# Other code reads an exported graph with these; they live in export.convert.
from export.convert import count_batchnorm_with_statistics, export_model  # noqa: F401
from export.convert import parse_int8_exclude
from export.pipeline import export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.onnx", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", help="registry name or alias (resnext50, densenet121, resnext_mini, ...); "
                   "optional with --checkpoint")
    w = p.add_argument_group("weights (default: random initialisation, for benchmarks)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="a zoo.train checkpoint: model, norm, classes, "
                     "input size, mean/std and dataset come from it")
    src.add_argument("--torchvision-weights", metavar="PATH",
                     help="a torchvision state_dict file for the same architecture (strict load)")
    w.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="a --model-ema checkpoint's averaged (--ema) or raw (--no-ema) weights "
                   "(default: whichever scored its val accuracy, as best.pt's 'selected' says)")
    w.add_argument("--norm", choices=("bn", "gn", "ln", "in"), default=None,
                   help="norm of a random-init model (default bn; a checkpoint brings its own)")
    w.add_argument("--num-classes", type=int, default=None,
                   help="classifier size without a checkpoint (default 1000, or the torchvision file's)")
    w.add_argument("--labels", metavar="FILE", help="class labels, one per line (default class_0, class_1, ...)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT, help="model repository root")
    o.add_argument("--name", default=None, help="model directory name (default: the registry name)")
    o.add_argument("--version", type=int, default=None, help="version directory (default: next free, from 1)")
    o.add_argument("--triton", action="store_true", help="also write config.pbtxt for Triton Inference Server")
    o.add_argument("--max-batch-size", type=int, default=TRITON_MAX_BATCH, help="Triton max_batch_size")
    o.add_argument("--json", metavar="PATH", default=None,
                   help="also write the result as JSON (paths, parities, latency, int8 choices, graph audit)")
    e = p.add_argument_group("export")
    e.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']} for torchscript, "
                        f"{DEFAULT_OPSET['dynamo']} for dynamo)")
    e.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx.export(dynamo=False) (fast, what the tests use) or dynamo=True")
    e.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="export resolution (default: the checkpoint's or the model's)")
    e.add_argument("--no-fold", action="store_true", help="keep BatchNorm (exported as the exporter sees fit)")
    e.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16: fp16 weights and compute, fp32 I/O; int8: static QDQ, uint8 activations, "
                        "int8 per-channel weights")
    e.add_argument("--int8-exclude", metavar="auto|none|OP_TYPES", default=None,
                   help="int8 nodes kept fp32: auto (default: the grouped convs whose int8 form measured slower "
                        "here), none, or comma-separated ONNX op types (e.g. Conv,Gemm)")
    v = p.add_argument_group("verification and calibration")
    v.add_argument("--calib-data", metavar="SPEC", default=None,
                   help="digits | synthetic | folder:PATH: int8 calibration and val images "
                        "(default: the checkpoint's dataset)")
    v.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES, help="train images used to calibrate int8")
    v.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="int8 activation ranges")
    v.add_argument("--val-samples", type=int, default=VAL_SAMPLES, help="val images verified (0: none)")
    v.add_argument("--latency-runs", type=int, default=LATENCY_RUNS, help="batch-1 runs timed (0: skip)")
    v.add_argument("--threads", type=int, default=0,
                   help="threads for PyTorch and onnxruntime (0: their defaults, all cores)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(
        model=args.model, checkpoint=args.checkpoint, ema=args.ema, torchvision_weights=args.torchvision_weights,
        norm=args.norm,
        num_classes=args.num_classes, labels=args.labels, out=args.out, name=args.name, version=args.version,
        triton=args.triton, max_batch_size=args.max_batch_size, opset=args.opset, exporter=args.exporter,
        input_size=tuple(args.input_size) if args.input_size is not None else None, fold=not args.no_fold,
        precision=args.precision, calib_data=args.calib_data, calib_samples=args.calib_samples,
        calib_method=args.calib_method, int8_exclude=args.int8_exclude or INT8_EXCLUDE,
        val_samples=args.val_samples, latency_runs=args.latency_runs,
        threads=args.threads, progress_bars=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.ema is not None and not args.checkpoint:
            raise UserError("--ema/--no-ema choose a checkpoint's weights: give --checkpoint")
        if args.int8_exclude is not None:
            if args.precision != "int8":
                raise UserError("--int8-exclude applies to --precision int8 only")
            try:
                parse_int8_exclude(args.int8_exclude)
            except ValueError as e:
                raise UserError(str(e)) from None
        result = export(config_from_args(args))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        if e.summary:
            print(e.summary, flush=True)
        print(f"{prog}: verification failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(result.summary)
    if args.json:
        from zoo.fileio import atomic_write

        try:
            atomic_write(args.json, (json.dumps(result.to_json(), indent=1) + "\n").encode())
        except OSError as e:
            print(f"{prog}: error: exported, but cannot write --json {args.json}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
