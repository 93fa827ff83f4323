"""What the experiments' reports share: the noise test, markdown tables, figures and JSON."""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from contract.cli import md_table  # noqa: F401 (the experiments' tables, re-exported)
from zoo.fileio import atomic_write


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def differs(a: float, b: float, n: int) -> bool:
    """Whether error rates a and b on n images differ by more than twice their standard error."""
    return abs(a - b) > 2 * math.sqrt(binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2)


def fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def settings_block(cfg: dict[str, Any]) -> str:
    return "\n".join(f"- `{k}`: {v if not isinstance(v, (tuple, list)) else ', '.join(map(str, v))}"
                     for k, v in cfg.items())


def save_figure(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve starts at the first step."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))
