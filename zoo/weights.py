"""Loading weights safely: our training checkpoints, torchvision state_dict files, or ``.safetensors``
files (timm publishes its weights so)."""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any, Mapping

import torch
from torch import nn


# torchvision's own DenseNet .pth files predate its module names ("norm.1" for "norm1");
# torchvision renames them on load with this pattern (torchvision/models/densenet.py).
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message says why."""


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file, by its content, not its name: 8 bytes of header
    length (little-endian), then the JSON header, which opens with ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, on the CPU, read by the ``safetensors`` package: the
    format holds tensors only, so it cannot run code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: not a readable safetensors file ({reason})") from None


def torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: the file cannot run code. Raises what
    torch raises (:func:`load_failure` says it in a few words)."""
    with warnings.catch_warnings():
        # Any plain pickle (a file that is not torch's zip format) draws this; the error that
        # follows, if any, says what matters.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words.

    torch's own message advises loading again with ``weights_only=False``, which runs whatever
    code the file holds: that advice is left out.
    """
    text = str(e)
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return (f"it holds a Python object ({unsafe.group(1)}) besides tensors and plain values, "
                "which only code execution could load")
    if isinstance(e, EOFError):
        return "the file ends early"
    if "Weights only load failed" in text:
        return "not a PyTorch file"
    if "failed finding central directory" in text:
        return "not a whole zip archive"
    first = text.splitlines()[0].split(". ")[0][:160] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def state_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state_dict: each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The model state_dict inside ``path``: a zoo checkpoint (its ``model`` entry), a
    ``{"state_dict": ...}`` file, a bare state_dict such as torchvision's ``.pth`` files, or a
    ``.safetensors`` file such as timm's (recognised by its content).

    Loads with ``weights_only=True``: the file cannot run code. DistributedDataParallel's
    ``module.`` prefix and torchvision's legacy DenseNet names (``norm.1``) are translated.
    """
    return read_weights(path)[0]


def read_weights(path: str | os.PathLike) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_state_dict`, read once, and what a zoo checkpoint says of its model
    (``model_name``, ``model_args``); ``{}`` for other files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    obj: Any
    if is_safetensors(path):
        obj = read_safetensors(path)
    else:
        try:
            obj = torch_load(path)
        except Exception as e:  # corrupt, truncated, or not a torch file at all
            raise WeightsError(f"{path}: not a readable weights file ({load_failure(e)})") from None
    # Only a zoo checkpoint (a torch file) describes its model; a safetensors file holds tensors alone.
    about = ({k: obj[k] for k in ("model_name", "model_args", "pruned") if k in obj}
             if isinstance(obj, Mapping) and not isinstance(obj.get("model_name"), torch.Tensor) else {})
    if isinstance(obj, Mapping) and "checksum" in obj and isinstance(obj.get("model"), Mapping):
        if state_checksum(obj["model"]) != obj["checksum"]:
            raise WeightsError(f"{path}: checksum mismatch, the weights are corrupt")
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state_dict of tensors")
    # DistributedDataParallel saves parameters under "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {_LEGACY_DENSENET.sub(r"\1\2", k): v for k, v in obj.items()}, about


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 5) -> str | None:
    """One line naming missing, unexpected and wrongly shaped keys, or None when ``state`` fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts) or None


def classifier_prefix(model: nn.Module) -> str:
    """The state_dict prefix of ``model.get_classifier()`` (``fc.``, ``classifier.``)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    name = next((name for name, m in model.named_modules() if head is not None and m is head), None)
    if not name:
        raise WeightsError(f"{type(model).__name__} has no classifier head (get_classifier)")
    return name + "."


def load_weights(model: nn.Module, path: str | os.PathLike, *, head: bool = True) -> nn.Module:
    """Load ``path`` into ``model`` strictly; a mismatch raises :class:`WeightsError` naming the keys.

    ``head=False`` loads everything but the classifier head, which keeps its fresh initialisation:
    fine-tuning ImageNet weights (1000 classes) into a model with ``num_classes`` of your own.
    A pruned checkpoint's layer sizes (``zoo.pruned``) are applied to ``model`` first.
    """
    state, about = read_weights(path)
    if about.get("pruned"):
        from zoo.pruned import apply

        try:
            apply(model, about["pruned"])
        except ValueError as e:
            raise WeightsError(f"{os.fspath(path)}: {e}") from None
    return load_state(model, state, head=head, source=os.fspath(path))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, head: bool = True,
               source: str = "state_dict") -> nn.Module:
    """:func:`load_weights` for a state_dict already read (``source`` names it in errors)."""
    if not head:
        prefix = classifier_prefix(model)
        own = model.state_dict()
        state = {**{k: v for k, v in state.items() if not k.startswith(prefix)},
                 **{k: v for k, v in own.items() if k.startswith(prefix)}}
    problem = describe_mismatch(model, state)
    if problem:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)
    return model
