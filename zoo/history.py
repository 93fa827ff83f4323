"""A training run's history: ``metrics.jsonl`` (one JSON object per epoch) and ``curves.png`` drawn
from it, both written atomically so a killed run leaves the previous epoch's files."""
from __future__ import annotations

import io
import json
import os
from typing import Any

from zoo.fileio import atomic_write


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="val accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def read_history(path: str, up_to_epoch: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows of epochs <= up_to_epoch (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in history))
