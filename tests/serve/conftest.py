"""Serving fixtures: two mini models exported once per session, and servers on 127.0.0.1:0.

Nothing is trained: a checkpoint of a freshly built model (BatchNorm statistics randomised so
that folding and preprocessing mistakes show in the logits) goes through the real
``python -m export.onnx`` into a model repository that every serving test reads.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterator

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import export.onnx as exp
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import Repository, load_repository
from serve.server import Server, create_server
from tests.conftest import randomize_bn_stats
from zoo.checkpoint import save_checkpoint
from zoo.registry import create_model

SERVE_MODELS = ("resnext_mini", "densenet_mini")
CLASSES = [f"digit{i}" for i in range(10)]
INPUT_SIZE = [3, 32, 32]
# Different per channel, so a channel-order or normalisation slip changes the logits.
MEAN = [0.2, 0.3, 0.4]
STD = [0.25, 0.2, 0.3]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Exported:
    root: str  # the model repository
    checkpoints: dict[str, str]  # model name -> checkpoint path


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Exported:
    work = tmp_path_factory.mktemp("serve-models")
    root = work / "models"
    checkpoints = {}
    for i, name in enumerate(SERVE_MODELS):
        torch.manual_seed(i)
        model = randomize_bn_stats(create_model(name, num_classes=len(CLASSES)))
        path = str(work / f"{name}.pt")
        save_checkpoint(path, dict(
            model=model.state_dict(), model_name=name,
            model_args=dict(num_classes=len(CLASSES), norm="bn", gn_groups=32, in_chans=3),
            classes=CLASSES, input_size=INPUT_SIZE, mean=MEAN, std=STD, crop_pct=1.0, data="digits",
            epoch=1, best_metric=0.0, config={}))
        code = exp.main([name, "--checkpoint", path, "--out", str(root), "--threads", "1", "--no-progress",
                         "--val-samples", "0", "--latency-runs", "0"])
        assert code == 0, f"export of {name} failed"
        checkpoints[name] = path
    return Exported(root=str(root), checkpoints=checkpoints)


@pytest.fixture
def copy_repo(exported, tmp_path):
    """A copy of the exported repository that a test may change."""
    root = tmp_path / "models"
    shutil.copytree(exported.root, root)
    return root


@pytest.fixture(scope="session")
def repo(exported) -> Repository:
    return load_repository(exported.root, providers="cpu", threads=1)


@contextlib.contextmanager
def running(repository: Repository, **kwargs) -> Iterator[tuple[Server, int]]:
    """A started server on 127.0.0.1:0, stopped on exit."""
    server, port = create_server(repository, "127.0.0.1:0", **kwargs)
    server.start()
    try:
        yield server, port
    finally:
        server.stop(grace=1.0)


@pytest.fixture(scope="module")
def server(repo) -> Iterator[tuple[Server, int]]:
    """The default configuration, with metrics on a free port."""
    with running(repo, metrics_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        yield pb_grpc.ClassifierStub(channel)


def png_bytes(array: np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def random_image(seed: int, height: int = 40, width: int = 52, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    # smooth-ish content: random low-res noise upsampled, so resizing has real work to do
    small = rng.integers(0, 256, size=(max(height // 4, 1), max(width // 4, 1)) + shape[2:], dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    return np.asarray(image)


def tensor_request(x: np.ndarray, **kwargs) -> pb.ClassifyRequest:
    x = np.ascontiguousarray(x)
    dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.uint8): "uint8"}[x.dtype]
    return pb.ClassifyRequest(tensor=pb.Tensor(shape=list(x.shape), dtype=dtype, data=x.tobytes()), **kwargs)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate (key.pem, cert.pem) for localhost and 127.0.0.1, and a token file."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    (d / "token").write_text("s3cret-token\n")
    return d


class Gate:
    """Wraps a model's run so a test can hold the batch worker busy."""

    def __init__(self, run):
        self.run, self.open, self.entered = run, threading.Event(), threading.Event()
        self.open.set()

    def __call__(self, x, *instance):
        self.entered.set()
        assert self.open.wait(60)
        return self.run(x, *instance)
