"""The model repository and its onnxruntime sessions.

A repository is the layout ``python -m export.onnx`` writes (Triton's; :mod:`contract.repository`)::

    DIR/NAME/VERSION/model.onnx     VERSION is a positive integer directory
    DIR/NAME/labels.txt             informational: the labels served come from the ONNX metadata
    DIR/NAME/config.pbtxt           optional (``export --triton``): its ``max_batch_size`` is the
                                    model's per-request batch limit for ModelInfer (see
                                    :func:`read_triton_max_batch`); the rest is Triton's alone

By default the newest version of every name is loaded; ``--model NAME[:VERSION]`` (repeatable)
picks names and pins versions. Every file is read into memory and the session is built from
those bytes, so a file deleted or replaced while serving changes nothing until a restart.
Everything the server needs (labels, input size, mean/std, crop_pct) comes from the metadata of
:mod:`contract.metadata`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

try:
    import onnxruntime as ort
except ImportError as e:  # it comes from an extra: say which
    raise ImportError(f"{e}: onnxruntime is not installed; pip install -e '.[cpu]' "
                      "(or '.[gpu]' for onnxruntime-gpu)") from e

from contract import repository as layout
from contract.metadata import INPUT_NAME, OUTPUT_NAME, MetadataError, decode_metadata
from contract.names import is_model_name, split_model_ref
from contract.repository import CONFIG_FILE, MODEL_FILE, ConfigError, read_config

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# onnxruntime's own log: errors only (its warnings about unused initializers are noise here).
ORT_LOG_SEVERITY = 3


class RepositoryError(Exception):
    """The repository cannot be served; the message is one line naming the file or option."""


@dataclass
class Model:
    """One loaded model version: its session and the metadata serving needs."""

    name: str
    version: int
    path: str
    session: Any  # onnxruntime.InferenceSession
    meta: dict[str, Any]
    provider: str
    # config.pbtxt's max_batch_size when the model directory has one (and it is > 0): the
    # largest batch one ModelInfer request may carry. None: the server's --max-batch.
    max_batch_size: int | None = None

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_size"])  # type: ignore[return-value]

    @property
    def mean(self) -> list[float]:
        return self.meta["mean"]

    @property
    def std(self) -> list[float]:
        return self.meta["std"]

    @property
    def crop_pct(self) -> float:
        return self.meta["crop_pct"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``[N, classes]`` for a float32 batch ``[N, C, H, W]``."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


@dataclass
class Repository:
    """Loaded models by name and version; names are looked up here only, never on disk."""

    root: str
    models: dict[str, dict[int, Model]] = field(default_factory=dict)
    # Every version directory of each loaded name at load time: what a request for a version not
    # loaded is told it could have (without reading the disk on a request).
    on_disk: dict[str, list[int]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.models)

    def all(self) -> list[Model]:
        return [self.models[n][v] for n in self.names() for v in sorted(self.models[n])]

    def get(self, name: str, version: int = 0) -> Model | None:
        """The model ``name`` at ``version`` (0: the newest loaded), or None."""
        versions = self.models.get(name)
        if not versions:
            return None
        return versions[max(versions)] if version == 0 else versions.get(version)

    def describe(self) -> str:
        return ", ".join(f"{m.name}:{m.version} {m.meta['precision']}" for m in self.all())


def resolve_providers(choice: str) -> list[str]:
    """The onnxruntime provider list for ``--providers``.

    ``auto`` takes CUDA when this onnxruntime build has it (onnxruntime-gpu), else the CPU;
    ``cuda`` without it raises :class:`RepositoryError`.
    """
    if choice not in PROVIDER_CHOICES:
        raise RepositoryError(f"unknown --providers {choice!r}; choose from {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda" and CUDA not in available:
        raise RepositoryError(
            f"--providers cuda: this onnxruntime {ort.__version__} has no {CUDA} (available: "
            f"{', '.join(available)}){_gpu_build_hint()}")
    return [CUDA, CPU] if CUDA in available else [CPU]


def _gpu_build_hint() -> str:
    """How to get a CUDA build from here: onnxruntime and onnxruntime-gpu in one environment
    shadow each other, so the CPU build goes first."""
    import importlib.metadata as md

    try:
        md.version("onnxruntime")
    except md.PackageNotFoundError:
        return "; on a machine with a GPU and CUDA, onnxruntime-gpu provides it"
    return ("; on a machine with a GPU, replace the CPU build with onnxruntime-gpu: pip uninstall onnxruntime && "
            "pip install -e '.[gpu]' (never both in one environment)")


def session_options(threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
    opts.inter_op_num_threads = 1  # a classifier graph is a chain: no parallel branches worth threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = ORT_LOG_SEVERITY
    return opts


def parse_model_specs(specs: Sequence[str]) -> dict[str, set[int]]:
    """``["a", "b:2", "b:3"]`` -> ``{"a": set(), "b": {2, 3}}`` (empty set: the newest version)."""
    wanted: dict[str, set[int]] = {}
    for spec in specs:
        name, version = split_model_ref(spec)
        if not is_model_name(name) or ":" in name:
            raise RepositoryError(f"invalid --model {spec!r}: expected NAME or NAME:VERSION "
                                  "(VERSION a positive integer)")
        wanted.setdefault(name, set())
        if version is not None:
            wanted[name].add(version)
    return wanted


def read_triton_max_batch(model_dir: str) -> int | None:
    """``max_batch_size`` of ``model_dir/config.pbtxt``, or None without the file or when it is 0.

    Triton reads the same file: ``max_batch_size`` is the largest batch one request may carry
    (0 there means the model takes no batch dimension, which a zoo export never writes; it is
    read here as "no per-model limit"). RepositoryError names a file that is unreadable, is not a
    Triton model config, or whose value is negative.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        config = read_config(path)
    except ConfigError as e:
        raise RepositoryError(str(e)) from None
    if config is None:
        return None
    if config.max_batch_size < 0:
        raise RepositoryError(f"{path}: max_batch_size {str(config.max_batch_size)!r} is not a non-negative integer")
    return config.max_batch_size or None


def load_model(path: str, name: str, version: int, providers: Sequence[str], threads: int,
               require: str | None = None) -> Model:
    """Read ``path`` into memory and build its session; RepositoryError names the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RepositoryError(f"cannot read model file {path}: {e.strerror or e}") from None
    if not data:
        raise RepositoryError(f"model file {path} is empty")
    try:
        session = ort.InferenceSession(data, session_options(threads), providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RepositoryError(f"corrupt or truncated model file {path}: {first}") from None
    try:
        meta = decode_metadata(session.get_modelmeta().custom_metadata_map)
    except MetadataError as e:
        raise RepositoryError(f"model file {path}: {e}") from None
    _check_graph(session, meta, path)
    provider = session.get_providers()[0]
    if require is not None and provider != require:
        raise RepositoryError(f"--providers cuda: onnxruntime fell back to {provider} for {path} "
                              "(no usable GPU or CUDA libraries)")
    model = Model(name=name, version=version, path=path, session=session, meta=meta, provider=provider)
    # One run now: the first request does not pay onnxruntime's first-run setup, and a model
    # that loads but cannot run stops the start instead of failing every request.
    try:
        out = model.run(np.zeros((1, *model.input_size), np.float32))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RepositoryError(f"model file {path} loads but does not run: {first}") from None
    if out.shape != (1, len(model.labels)):
        raise RepositoryError(f"model file {path}: logits of shape {list(out.shape)} for {len(model.labels)} labels")
    return model


def _check_graph(session: Any, meta: dict[str, Any], path: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names_in, names_out = [i.name for i in inputs], [o.name for o in outputs]
    if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
        raise RepositoryError(f"model file {path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                              f"got inputs {names_in} and outputs {names_out}")
    shape = inputs[names_in.index(INPUT_NAME)].shape
    static = [d for d in shape[1:]]
    if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(static, meta["input_size"])):
        raise RepositoryError(f"model file {path}: graph input {shape} does not fit metadata input_size "
                              f"{meta['input_size']}")
    out = outputs[names_out.index(OUTPUT_NAME)].shape
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(meta["labels"])):
        raise RepositoryError(f"model file {path}: graph output {out} does not fit {len(meta['labels'])} labels")


def load_repository(root: str, providers: str = "auto", threads: int = 0,
                    models: Sequence[str] = ()) -> Repository:
    """Load the newest version of every model under ``root`` (or the ``models`` specs).

    Args:
        root: the model repository directory.
        providers: ``auto``, ``cpu`` or ``cuda`` (see :func:`resolve_providers`).
        threads: onnxruntime intra-op threads per session (0: onnxruntime's default).
        models: ``NAME`` or ``NAME:VERSION`` specs; empty loads everything.

    Raises:
        RepositoryError: one line naming the directory, file or option at fault.
    """
    provider_list = resolve_providers(providers)
    require = CUDA if providers == "cuda" else None
    if not os.path.isdir(root):
        raise RepositoryError(f"--model-dir {root}: no such directory")
    wanted = parse_model_specs(models)
    if wanted:
        names = sorted(wanted)
        for name in names:
            if not os.path.isdir(os.path.join(root, name)):
                raise RepositoryError(f"--model {name}: no directory {os.path.join(root, name)}")
    else:
        names = layout.model_names(root)
    if not names:
        raise RepositoryError(f"--model-dir {root}: no models (expected {root}/NAME/VERSION/{MODEL_FILE})")
    repo = Repository(root=root)
    for name in names:
        model_dir = os.path.join(root, name)
        available = layout.versions(model_dir)
        repo.on_disk[name] = available
        versions = sorted(wanted.get(name) or ([available[-1]] if available else []))
        if not versions:
            raise RepositoryError(f"{model_dir}: no version directories (expected {model_dir}/1/{MODEL_FILE})")
        max_batch_size = read_triton_max_batch(model_dir)
        for version in versions:
            path = layout.model_file(model_dir, version)
            if not os.path.isfile(path):
                raise RepositoryError(f"missing model file {path}")
            model = load_model(path, name, version, provider_list, threads, require)
            model.max_batch_size = max_batch_size
            repo.models.setdefault(name, {})[version] = model
    return repo
