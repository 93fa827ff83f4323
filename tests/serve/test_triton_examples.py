"""Triton's own example clients (tests/triton_examples, unchanged) against ``serve``, as a Triton
user runs them: each in a subprocess (tritonclient's generated ``inference.*`` messages cannot
share a process with serve's), its printed classes checked against onnxruntime on the same
pixels. The model repository is the plain export (ModelConfig auto-completed) or the one
``export --triton`` writes (ModelConfig from its config.pbtxt)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import export.onnx as exp
from serve.runtime import load_repository
from tests.serve.conftest import REPO_ROOT, random_image, running

MODEL = "resnext_mini"
EXAMPLES = os.path.join(REPO_ROOT, "tests", "triton_examples")
# One line per class: "    SCORE (INDEX) = LABEL", as both examples print them.
CLASS_LINE = re.compile(r"^ {4}(-?[0-9.]+) \((\d+)\) = (\S+)$")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                reason="tritonclient is not installed (it is in the dev extra)")


@pytest.fixture(scope="module")
def triton_repo(exported, tmp_path_factory):
    """resnext_mini exported with --triton (max_batch_size 4)."""
    root = tmp_path_factory.mktemp("triton") / "models"
    code = exp.main([MODEL, "--checkpoint", exported.checkpoints[MODEL], "--out", str(root), "--triton",
                     "--max-batch-size", "4", "--threads", "1", "--no-progress", "--val-samples", "0",
                     "--latency-runs", "0"])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two PNG images of another size than the model's input, in one folder."""
    d = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(random_image(40 + i, height=48, width=40)).save(d / f"img{i}.png")
    return d


def expected_top(model, path: str, k: int) -> list[int]:
    """The top ``k`` class indices the model gives the pixels the examples send: the image
    resized to the input size (bilinear), RGB, raw 0..255 floats, NCHW (their --scaling NONE)."""
    c, h, w = model.input_size
    pixels = np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
    logits = model.run(pixels.transpose(2, 0, 1)[None].copy())[0]
    return [int(i) for i in np.argsort(-logits, kind="stable")[:k]]


def run_example(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                            timeout=120)  # only a hang reaches it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.splitlines()


def classes(lines: list[str], k: int) -> list[list[int]]:
    """The printed class indices, ``k`` per image, in print order."""
    found = [int(m.group(2)) for m in map(CLASS_LINE.match, lines) if m]
    assert found and len(found) % k == 0, lines
    return [found[i:i + k] for i in range(0, len(found), k)]


@pytest.mark.parametrize("flags", [[], ["-a"], ["--streaming"]], ids=["plain", "async", "streaming"])
def test_image_client_grpc(repo, images, flags):
    """The flagship example on the plain export: ModelMetadata, ModelConfig (auto-completed),
    ModelInfer with the classification extension (and its async and streaming forms)."""
    path = str(images / "img0.png")
    with running(repo) as (_, port):
        lines = run_example("image_client.py", "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", MODEL, "-c", "3",
                            *flags, path)
    assert "PASS" in lines
    assert classes(lines, 3) == [expected_top(repo.get(MODEL), path, 3)]


def test_image_client_batch_of_two_from_the_triton_repository(triton_repo, images):
    """-b 2 -c 3 on a folder: one request of both images, config.pbtxt's max_batch_size read."""
    repo = load_repository(str(triton_repo), providers="cpu", threads=1)
    with running(repo) as (_, port):
        lines = run_example("image_client.py", "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", MODEL, "-b", "2",
                            "-c", "3", str(images))
    assert "Request 1, batch size 2" in lines and "PASS" in lines
    model = repo.get(MODEL)
    assert classes(lines, 3) == [expected_top(model, str(images / f"img{i}.png"), 3) for i in range(2)]


def test_grpc_image_client(triton_repo, images):
    """The example built on Triton's raw gRPC stubs (ModelMetadata, ModelConfig, ModelInfer)."""
    repo = load_repository(str(triton_repo), providers="cpu", threads=1)
    path = str(images / "img1.png")
    with running(repo) as (_, port):
        lines = run_example("grpc_image_client.py", "-u", f"127.0.0.1:{port}", "-m", MODEL, "-c", "2", path)
    assert f"Image '{path}':" in lines
    assert classes(lines, 2) == [expected_top(repo.get(MODEL), path, 2)]
