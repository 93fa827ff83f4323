"""``python -m zoo.eval``: measure a trained checkpoint or an exported ``model.onnx`` on a dataset.

    python -m zoo.eval runs/digits/best.pt                              # its own data's val split
    python -m zoo.eval models/resnext_mini/1/model.onnx --data digits   # what the server runs
    python -m zoo.eval runs/flowers/best.pt --data folder:data/flowers --split all --out runs/flowers/eval

A checkpoint runs in PyTorch (its selected weights: the EMA's when they scored better; ``--ema``
/ ``--no-ema`` choose); a ``.onnx`` file runs in onnxruntime with the preprocessing its metadata
states, the server's (``contract.preprocess.val_transform``), so a user measures what they serve.
Image folders are read file by file through that transform; ``digits`` and ``synthetic`` are
arrays, fed as the training run fed them. The split is the training run's (its seed and
``--val-fraction``, read from the checkpoint, or from the checkpoint an ONNX file names as its
source when that file exists).

Prints top-1/top-5, per-class precision/recall/F1 and the most confused pairs; writes under
``--out`` (default: ``eval/`` beside the model file) ``metrics.json`` (``top1``, ``top5``,
``per_class``, ``confusion`` (rows: true class, each row's fractions), ``confusion_counts``, ...;
every rate a fraction in [0, 1]), ``confusion.png`` and ``errors.png`` (misclassified images,
most confident first, with true/predicted labels and scores).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from contract import preprocess
from contract.cli import HelpFormatter, text_table
from zoo.augment import Augment
from zoo.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint, model_from_checkpoint
from zoo.data import DATA_SPECS, DataError, build_datasets, skipped_line
from zoo.fileio import atomic_write

SPLITS = ("val", "train", "all")
MOST_CONFUSED = 5  # pairs printed
PER_CLASS_SHOWN = 30  # classes printed (metrics.json has all)


class EvalError(Exception):
    """A problem to report to the user in one line (exit 2)."""


@dataclass
class Subject:
    """What is evaluated: a function from a normalised batch to logits, and its settings."""

    kind: str  # "checkpoint" or "onnx"
    predict: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    data: str | None  # the spec it was trained on, when known
    seed: int
    val_fraction: float
    weights: str  # "model", "ema", or the ONNX precision


class FileDataset(Dataset):
    """``(path, target)`` samples through ``contract.preprocess.val_transform`` with ``config``."""

    def __init__(self, samples: Sequence[tuple[str, int]], config: preprocess.PreprocessConfig) -> None:
        self.samples, self.config = list(samples), config
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = preprocess.decode_image(Path(path).read_bytes())
        return torch.from_numpy(preprocess.val_transform(image, self.config)), target


def _training_split(ckpt: dict[str, Any]) -> tuple[int, float]:
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return int(config.get("seed", 0)), float(config.get("val_fraction", 0.2))


def load_subject(path: str, ema: bool | None = None, threads: int = 0) -> Subject:
    """The model at ``path``: a zoo checkpoint, or an exported ONNX file (by its ``.onnx`` suffix)."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    if path.endswith(".onnx"):
        if ema is not None:
            raise EvalError("--ema/--no-ema choose a checkpoint's weights; an ONNX file holds one set")
        return _onnx_subject(path, threads)
    try:
        ckpt = load_checkpoint(path)
        _, which = checkpoint_weights(ckpt, ema, path)
        model = model_from_checkpoint(ckpt, path, ema=ema).eval()
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    seed, val_fraction = _training_split(ckpt)

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return Subject("checkpoint", predict, [str(c) for c in ckpt["classes"]],
                   tuple(int(v) for v in ckpt["input_size"]), tuple(float(v) for v in ckpt["mean"]),
                   tuple(float(v) for v in ckpt["std"]), float(ckpt.get("crop_pct", preprocess.CROP_PCT)),
                   ckpt.get("data"), seed, val_fraction, which)


def _onnx_subject(path: str, threads: int) -> Subject:
    import onnxruntime as ort

    from contract.metadata import INPUT_NAME, MetadataError, read_metadata

    try:
        meta = read_metadata(path)
    except (MetadataError, OSError, ValueError) as e:
        raise EvalError(f"{path}: {str(e).splitlines()[0]}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    seed, val_fraction = 0, 0.2
    source = str(meta.get("source", ""))
    if source.startswith("checkpoint:"):  # the training run's split, when its checkpoint is still there
        ckpt_path = source[len("checkpoint:"):].rsplit(" sha256:", 1)[0]
        if os.path.isfile(ckpt_path):
            try:
                seed, val_fraction = _training_split(load_checkpoint(ckpt_path))
            except CheckpointError:
                pass

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return Subject("onnx", predict, list(meta["labels"]), tuple(meta["input_size"]), tuple(meta["mean"]),
                   tuple(meta["std"]), float(meta["crop_pct"]), meta.get("data"), seed, val_fraction,
                   str(meta["precision"]))


def eval_dataset(subject: Subject, spec: str, split: str, seed: int, val_fraction: float) -> tuple[Dataset, list[str]]:
    """The images of ``split`` and the dataset's class labels; image folders through the subject's
    own val transform."""
    try:
        bundle = build_datasets(spec, subject.input_size, seed=seed, val_fraction=val_fraction,
                                augment=Augment(enabled=False))
    except DataError as e:
        raise EvalError(str(e)) from None
    if bundle.skipped:
        print(skipped_line(bundle.skipped), flush=True)
    parts = {"val": [bundle.val], "train": [bundle.train], "all": [bundle.train, bundle.val]}[split]
    if hasattr(bundle.val, "samples"):
        try:
            config = preprocess.PreprocessConfig(subject.input_size, subject.mean, subject.std, subject.crop_pct)
        except preprocess.PreprocessError as e:
            raise EvalError(str(e)) from None
        parts = [FileDataset(p.samples, config) for p in parts]
    dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return dataset, list(bundle.classes)


def run(subject: Subject, dataset: Dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits (N, C), targets (N,), inputs (N, C, H, W))`` over ``dataset``."""
    logits, targets, inputs = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = x.numpy()
        logits.append(subject.predict(batch))
        targets.append(y.numpy())
        inputs.append(batch)
    return np.concatenate(logits), np.concatenate(targets), np.concatenate(inputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def compute_metrics(logits: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5, per-class precision/recall/F1/support and the confusion matrix."""
    n, k = len(targets), len(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    pred = order[:, 0]
    top5 = float((order[:, :min(5, k)] == targets[:, None]).any(1).mean()) if n else 0.0
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (targets, pred), 1)
    per_class = {}
    for c, name in enumerate(labels):
        tp, predicted, support = int(counts[c, c]), int(counts[:, c].sum()), int(counts[c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = dict(precision=precision, recall=recall, f1=f1, support=support)
    rows = counts.sum(1, keepdims=True)
    confusion = np.divide(counts, rows, out=np.zeros((k, k)), where=rows > 0)
    pairs = [(int(counts[t, p]), t, p) for t in range(k) for p in range(k) if t != p and counts[t, p]]
    pairs.sort(key=lambda v: (-v[0], v[1], v[2]))
    return dict(top1=float((pred == targets).mean()) if n else 0.0, top5=top5, images=n, labels=list(labels),
                per_class=per_class, confusion=confusion.tolist(), confusion_counts=counts.tolist(),
                most_confused=[dict(true=labels[t], predicted=labels[p], count=c) for c, t, p in pairs])


# ------------------------------------------------------------------------------ figures


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_confusion(metrics: dict[str, Any], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = metrics["labels"], np.asarray(metrics["confusion"])
    k = len(labels)
    side = min(max(4.0, 0.45 * k + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels, rotation=90 if k > 10 else 0)
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if matrix[t, p] > 0:
                    ax.text(p, t, f"{matrix[t, p]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[t, p] > 0.5 else "black")
    fig.tight_layout()
    return _png(fig)


def plot_errors(inputs: np.ndarray, logits: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                mean: Sequence[float], std: Sequence[float], limit: int = 25) -> bytes:
    """A grid of the misclassified images, the most confidently wrong first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = softmax(logits)
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != targets)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:limit]
    cols = max(1, min(5, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    m, s = np.asarray(mean).reshape(-1, 1, 1), np.asarray(std).reshape(-1, 1, 1)
    for ax, i in zip(axes.flat, wrong):
        image = np.clip(inputs[i] * s + m, 0.0, 1.0).transpose(1, 2, 0)
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None,
                  vmin=0.0, vmax=1.0)
        ax.set_title(f"true {labels[targets[i]]}\npred {labels[pred[i]]} ({probs[i, pred[i]]:.2f})", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoo.eval", description=__doc__.split("\n")[0].replace("``", ""),
                                formatter_class=HelpFormatter)
    p.add_argument("model", metavar="CKPT_OR_ONNX", help="a zoo.train checkpoint (.pt) or an exported model.onnx")
    p.add_argument("--data", help=f"one of: {', '.join(DATA_SPECS)} (default: the data the model was trained on)")
    p.add_argument("--split", choices=SPLITS, default="val", help="which images of --data")
    p.add_argument("--seed", type=int, help="the split's seed (default: the training run's, else 0)")
    p.add_argument("--val-fraction", type=float, help="the split's val share (default: the training run's, else 0.2)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="a checkpoint's EMA weights, or its raw ones (default: those that scored best)")
    p.add_argument("--out", help="output folder (default: eval/ beside the model file)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--errors", type=int, default=25, metavar="N", help="misclassified images drawn in errors.png")
    return p


def evaluate_file(path: str, data: str | None = None, split: str = "val", out: str | None = None,
                  ema: bool | None = None, seed: int | None = None, val_fraction: float | None = None,
                  batch_size: int = 64, errors: int = 25, quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``path`` and write the outputs; return ``metrics.json``'s content."""
    subject = load_subject(path, ema)
    spec = data or subject.data
    if not spec:
        raise EvalError(f"{path} does not say which data it was trained on: pass --data")
    dataset, classes = eval_dataset(subject, spec, split, subject.seed if seed is None else seed,
                                    subject.val_fraction if val_fraction is None else val_fraction)
    if classes != subject.labels:
        only_model = sorted(set(subject.labels) - set(classes))
        only_data = sorted(set(classes) - set(subject.labels))
        detail = (f"only in the model: {', '.join(only_model[:5]) or '-'}; only in the data: "
                  f"{', '.join(only_data[:5]) or '-'}") if only_model or only_data else "same names in another order"
        raise EvalError(f"{path} has other classes than --data {spec} ({detail})")
    logits, targets, inputs = run(subject, dataset, batch_size)
    metrics = compute_metrics(logits, targets, subject.labels)
    metrics.update(model=os.path.abspath(path), kind=subject.kind, weights=subject.weights, data=spec, split=split)
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    title = f"{os.path.basename(path)} on {spec} ({split}): top-1 {100 * metrics['top1']:.2f}%"
    atomic_write(os.path.join(out, "confusion.png"), plot_confusion(metrics, title))
    atomic_write(os.path.join(out, "errors.png"),
                 plot_errors(inputs, logits, targets, subject.labels, subject.mean, subject.std, errors))
    if not quiet:
        print(report(metrics, out))
    return metrics


def report(metrics: dict[str, Any], out: str) -> str:
    lines = [f"{metrics['kind']} {metrics['model']} ({metrics['weights']} weights) on {metrics['data']} "
             f"{metrics['split']}: {metrics['images']} images",
             f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%", ""]
    body = [[name, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])]
            for name, v in list(metrics["per_class"].items())[:PER_CLASS_SHOWN]]
    lines.append(text_table(["class", "precision", "recall", "f1", "images"], body))
    if len(metrics["per_class"]) > PER_CLASS_SHOWN:
        lines.append(f"... {len(metrics['per_class']) - PER_CLASS_SHOWN} more classes in metrics.json")
    pairs = metrics["most_confused"][:MOST_CONFUSED]
    if pairs:
        lines += ["", "most confused (true -> predicted: images): "
                  + ", ".join(f"{p['true']} -> {p['predicted']}: {p['count']}" for p in pairs)]
    lines += ["", f"wrote {out}: metrics.json confusion.png errors.png"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        evaluate_file(args.model, args.data, args.split, args.out, args.ema, args.seed, args.val_fraction,
                      args.batch_size, args.errors)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
