"""The model repository and its onnxruntime sessions.

A repository is the layout ``python -m export.onnx`` writes (Triton's; :mod:`contract.repository`)::

    DIR/NAME/VERSION/model.onnx     VERSION is a positive integer directory
    DIR/NAME/labels.txt             informational: the labels served come from the ONNX metadata
    DIR/NAME/config.pbtxt           optional (``export --triton``): its ``max_batch_size`` is the
                                    model's per-request batch limit for ModelInfer (see
                                    :func:`read_triton_max_batch`); the whole file is what the
                                    ModelConfig RPC answers

By default the newest version of every name is loaded; ``--model NAME[:VERSION]`` (repeatable)
picks names and pins versions. Every file is read into memory and the session is built from
those bytes, so a file deleted or replaced while serving changes nothing until a restart.
Everything the server needs (labels, input size, mean/std, crop_pct) comes from the metadata of
:mod:`contract.metadata`.
"""
from __future__ import annotations

import itertools
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
    # Every instance's onnxruntime.InferenceSession (Triton's instance_group: model calls that may
    # run at once, each on a session of its own with ``--threads`` threads).
    sessions: list[Any]
    meta: dict[str, Any]
    provider: str
    # config.pbtxt's max_batch_size when the model directory has one (and it is > 0): the
    # largest batch one ModelInfer request may carry. None: the server's --max-batch.
    max_batch_size: int | None = None
    # config.pbtxt as read at load (Triton's ModelConfig), None without one: what ModelConfig
    # answers, so a request never reads the disk.
    config: Any = None
    # (inode, size, mtime) of the file when it was read: a replaced model.onnx differs.
    signature: tuple[int, int, int] = (0, 0, 0)

    @property
    def session(self) -> Any:
        """The first instance's session (what metadata is read from)."""
        return self.sessions[0]

    @session.setter
    def session(self, value: Any) -> None:
        self.sessions[0] = value

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

    def run(self, batch: np.ndarray, instance: int = 0) -> np.ndarray:
        """Logits ``[N, classes]`` for a float32 batch ``[N, C, H, W]``, on one instance's session."""
        return self.sessions[instance].run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


@dataclass
class Repository:
    """Loaded models by name and version; names are looked up here only, never on disk."""

    root: str
    models: dict[str, dict[int, Model]] = field(default_factory=dict)
    # Every version directory of each loaded name at load time: what a request for a version not
    # loaded is told it could have (without reading the disk on a request).
    on_disk: dict[str, list[int]] = field(default_factory=dict)
    # How models are (re)loaded while serving (load_versions): what load_repository was given.
    providers: list[str] = field(default_factory=lambda: [CPU])
    threads: int = 0
    require: str | None = None
    # Run each model before it serves: once at batch 1 when its file is loaded, then the warmup
    # (:func:`warm_up`) before it is marked ready. False (``--no-warmup``): neither.
    warmup: bool = True
    # onnxruntime's intra-op threads spin between parallel sections (its default) or sleep (here:
    # the spinning thread takes the core the gRPC threads need; README's serving section has the
    # bench.serve figures). True (``--ort-spinning``): onnxruntime's default.
    spinning: bool = False
    # Instances of a model whose config.pbtxt has no instance_group (``--instances``).
    instances: int = 1

    def names(self) -> list[str]:
        return sorted(self.models)

    def all(self) -> list[Model]:
        # A name's versions are replaced as a whole dict, never changed in place, so a reader
        # sees one name's old or new versions, never a mix.
        found = [(n, self.models.get(n) or {}) for n in self.names()]
        return [versions[v] for _, versions in found for v in sorted(versions)]

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


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int, spinning: bool = False) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
    opts.inter_op_num_threads = 1  # a classifier graph is a chain: no parallel branches worth threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = ORT_LOG_SEVERITY
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
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
    config = read_triton_config(model_dir)
    return None if config is None else config.max_batch_size or None


def read_triton_config(model_dir: str) -> Any:
    """``model_dir/config.pbtxt`` as Triton's ModelConfig, or None without the file;
    RepositoryError as :func:`read_triton_max_batch` says."""
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        config = read_config(path)
    except ConfigError as e:
        raise RepositoryError(str(e)) from None
    if config is not None and config.max_batch_size < 0:
        raise RepositoryError(f"{path}: max_batch_size {str(config.max_batch_size)!r} is not a non-negative integer")
    return config


def load_model(path: str, name: str, version: int, providers: Sequence[str], threads: int,
               require: str | None = None, run: bool = True, spinning: bool = False, instances: int = 1) -> Model:
    """Read ``path`` into memory and build its session (one per instance); RepositoryError names the file. With
    ``run`` off the session is not run once (a model that loads but cannot run then fails its
    requests instead of its load, and a symbolic class dimension goes unchecked)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RepositoryError(f"cannot read model file {path}: {e.strerror or e}") from None
    if not data:
        raise RepositoryError(f"model file {path} is empty")
    if threads == 0 and instances > 1:  # one thread per core shared out, not one per core for each
        threads = max(1, available_cores() // instances)
    try:
        session = ort.InferenceSession(data, session_options(threads, spinning), providers=list(providers))
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
    model = Model(name=name, version=version, path=path, sessions=[session], meta=meta, provider=provider,
                  signature=file_signature(path))
    for _ in range(instances - 1):  # from the same bytes: every instance runs the file that was checked
        model.sessions.append(ort.InferenceSession(data, session_options(threads, spinning), providers=list(providers)))
    if not run:
        return model
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


def file_signature(path: str) -> tuple[int, int, int]:
    """What tells a replaced file from the one read: (inode, size, mtime); zeros when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def policy_versions(config: Any, available: Sequence[int]) -> list[int]:
    """The versions Triton's ``version_policy`` serves out of ``available`` (default: the newest)."""
    policy = config.version_policy.WhichOneof("policy_choice") if config is not None else None
    if policy == "all":
        return sorted(available)
    if policy == "specific":
        return sorted(set(available) & {int(v) for v in config.version_policy.specific.versions})
    n = config.version_policy.latest.num_versions if policy == "latest" else 1
    return sorted(available)[-max(n, 1):] if available else []


def instance_count(config: Any, default: int) -> int:
    """Sessions to run a model on: the counts of config.pbtxt's ``instance_group`` entries summed,
    ``default`` without any. As Triton completes a group for the onnxruntime backend: a CPU group
    without a count has 2, any other 1, and a GPU group has its count on each GPU it lists."""
    groups = list(getattr(config, "instance_group", ()))
    if not groups:
        return default
    return sum(group_count(g) * (max(1, len(g.gpus)) if g.kind == g.KIND_GPU else 1) for g in groups)


def group_count(group: Any) -> int:
    """An instance_group entry's count, completed as Triton does for the onnxruntime backend."""
    return group.count or (2 if group.kind == group.KIND_CPU else 1)


def warm_up(model: Model, batch_sizes: Sequence[int], model_dir: str) -> None:
    """Run ``model`` before it serves: config.pbtxt's ``model_warmup`` samples when it has
    some (Triton's; zero, random or file data), else zeros at each of ``batch_sizes``. The first
    requests then do not pay onnxruntime's setup for those batch sizes. RepositoryError names
    a sample that cannot be built or run."""
    rng = np.random.default_rng(0)
    runs: list[tuple[str, np.ndarray]] = []
    for sample in getattr(model.config, "model_warmup", ()):
        n = max(int(sample.batch_size), 1)
        spec = sample.inputs.get(INPUT_NAME)
        if spec is None or len(sample.inputs) != 1:
            raise RepositoryError(f"{model_dir}/{CONFIG_FILE}: model_warmup {sample.name!r} must give one input "
                                  f"named {INPUT_NAME!r}")
        shape = (n, *model.input_size)
        kind = spec.WhichOneof("input_data_type")
        if kind == "random_data":
            x = rng.standard_normal(shape).astype(np.float32)
        elif kind == "input_data_file":
            path = os.path.join(model_dir, "warmup", spec.input_data_file)
            try:
                one = np.fromfile(path, dtype="<f4")
            except OSError as e:
                raise RepositoryError(f"model_warmup {sample.name!r}: cannot read {path}: {e.strerror or e}") from None
            if one.size != int(np.prod(model.input_size)):
                raise RepositoryError(f"model_warmup {sample.name!r}: {path} holds {one.size} float32 values; the "
                                      f"input {list(model.input_size)} needs {int(np.prod(model.input_size))}")
            x = np.broadcast_to(one.reshape(model.input_size), shape).astype(np.float32)
        else:
            x = np.zeros(shape, np.float32)
        runs += [(sample.name, x)] * max(int(sample.count), 1)
    if not runs:
        runs = [(f"batch {n}", np.zeros((n, *model.input_size), np.float32)) for n in sorted(set(batch_sizes))]
    for (name, x), session in itertools.product(runs, model.sessions):  # as Triton, on every instance
        try:
            session.run([OUTPUT_NAME], {INPUT_NAME: x})
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RepositoryError(f"model file {model.path}: warmup {name} does not run: {first}") from None


def load_versions(repo: Repository, name: str) -> tuple[dict[int, Model], list[int]]:
    """``name``'s versions as its directory and config.pbtxt's version_policy say now: those
    loaded and unchanged are reused, new or replaced ones loaded (not warmed up). Returns them
    and every version directory. RepositoryError (nothing is kept) when one cannot be loaded."""
    model_dir = os.path.join(repo.root, name)
    if not is_model_name(name) or not os.path.isdir(model_dir):
        raise RepositoryError(f"no model directory {model_dir}")
    available = layout.versions(model_dir)
    config = read_triton_config(model_dir)
    wanted = policy_versions(config, available)
    if not wanted:
        raise RepositoryError(f"{model_dir}: no version to serve (version directories: "
                              f"{', '.join(map(str, available)) or 'none'}; version_policy of {CONFIG_FILE})")
    max_batch_size = None if config is None else config.max_batch_size or None
    current = repo.models.get(name) or {}
    out: dict[int, Model] = {}
    for version in wanted:
        path = layout.model_file(model_dir, version)
        if not os.path.isfile(path):
            raise RepositoryError(f"missing model file {path}")
        old = current.get(version)
        if (old is not None and old.signature == file_signature(path) and old.config == config
                and old.max_batch_size == max_batch_size):
            out[version] = old
            continue
        model = load_model(path, name, version, repo.providers, repo.threads, repo.require, repo.warmup,
                           spinning=repo.spinning, instances=instance_count(config, repo.instances))
        model.max_batch_size, model.config = max_batch_size, config
        out[version] = model
    return out, available


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
                    models: Sequence[str] = (), empty_ok: bool = False, warmup: bool = True,
                    spinning: bool = False, instances: int = 1) -> Repository:
    """Load the newest version of every model under ``root`` (or the ``models`` specs).

    Args:
        root: the model repository directory.
        providers: ``auto``, ``cpu`` or ``cuda`` (see :func:`resolve_providers`).
        threads: onnxruntime intra-op threads per session (0: onnxruntime's default).
        models: ``NAME`` or ``NAME:VERSION`` specs; empty loads everything (the versions each
            config.pbtxt's version_policy selects, by default the newest).
        empty_ok: with no ``models``, load none (``--model-control-mode explicit``).
        warmup: run each model before it serves, at this load and every later one
            (:attr:`Repository.warmup`); False (``--no-warmup``) marks models ready unrun.
        spinning: onnxruntime's intra-op threads spin while idle (:attr:`Repository.spinning`).
        instances: sessions per model whose config.pbtxt has no instance_group (:func:`instance_count`).

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
        names = [] if empty_ok else layout.model_names(root)
    if not names and not empty_ok:
        raise RepositoryError(f"--model-dir {root}: no models (expected {root}/NAME/VERSION/{MODEL_FILE})")
    if instances < 1:
        raise RepositoryError(f"--instances {instances}: at least 1")
    repo = Repository(root=root, providers=list(provider_list), threads=threads, require=require, warmup=warmup,
                      spinning=spinning, instances=instances)
    for name in names:
        model_dir = os.path.join(root, name)
        available = layout.versions(model_dir)
        repo.on_disk[name] = available
        if not available:
            raise RepositoryError(f"{model_dir}: no version directories (expected {model_dir}/1/{MODEL_FILE})")
        config = read_triton_config(model_dir)
        versions = sorted(wanted.get(name) or policy_versions(config, available))
        if not versions:
            raise RepositoryError(f"{model_dir}: version_policy of {CONFIG_FILE} selects none of the versions "
                                  f"{', '.join(map(str, available))}")
        max_batch_size = None if config is None else config.max_batch_size or None
        for version in versions:
            path = layout.model_file(model_dir, version)
            if not os.path.isfile(path):
                raise RepositoryError(f"missing model file {path}")
            model = load_model(path, name, version, provider_list, threads, require, warmup, spinning=spinning,
                               instances=instance_count(config, instances))
            model.max_batch_size, model.config = max_batch_size, config
            repo.models.setdefault(name, {})[version] = model
    return repo
