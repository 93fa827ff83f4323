"""zoo: ResNeXt and DenseNet classifiers with selectable normalization."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names are imported on first use, so that the torch-free modules of the package
# (zoo.fileio) import without loading torch.
_EXPORTS = {
    "WeightsError": "zoo.weights", "count_params": "zoo.registry", "create_model": "zoo.registry",
    "get_model_spec": "zoo.registry", "list_models": "zoo.registry", "load_weights": "zoo.weights",
}
__all__ = ["WeightsError", "count_params", "create_model", "get_model_spec", "list_models", "load_weights"]

if TYPE_CHECKING:
    from zoo.registry import count_params, create_model, get_model_spec, list_models
    from zoo.weights import WeightsError, load_weights


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:  # a submodule not imported yet (``import zoo`` used to load most of them)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
