"""The metadata contract between export and serve, end to end: ``crop_pct`` from a checkpoint to
the server's preprocessing, and the model files a server refuses at start (a bad value, an ONNX
file that is not a zoo export). contract.metadata's own checks are tested in tests/contract."""
from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx as exp
from contract.metadata import PREFIX, decode_metadata, read_metadata
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import RepositoryError, load_repository
from tests.conftest import randomize_bn_stats
from tests.serve.conftest import CLASSES, INPUT_SIZE, MEAN, REPO_ROOT, STD, png_bytes, running, tensor_request
from zoo import data as zdata
from zoo.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from zoo.registry import create_model

NAME = "photos"  # the repository name of the crop_pct model

# --------------------------------------------------------------------------- crop_pct end to end


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """A checkpoint carrying the folder-data crop (zdata.CROP_PCT), exported by ``export.onnx``,
    served in-process: (checkpoint path, ONNX path, server port)."""
    work = tmp_path_factory.mktemp("crop")
    torch.manual_seed(5)
    model = randomize_bn_stats(create_model("resnext_mini", num_classes=len(CLASSES)))
    path = str(work / "resnext_mini.pt")
    save_checkpoint(path, dict(
        model=model.state_dict(), model_name="resnext_mini",
        model_args=dict(num_classes=len(CLASSES), norm="bn", gn_groups=32, in_chans=3),
        classes=CLASSES, input_size=INPUT_SIZE, mean=MEAN, std=STD, crop_pct=zdata.CROP_PCT,
        epoch=1, best_metric=0.0, config={}))
    root = work / "models"
    assert exp.main(["resnext_mini", "--checkpoint", path, "--out", str(root), "--name", NAME, "--threads", "1",
                     "--no-progress", "--val-samples", "0", "--latency-runs", "0"]) == 0
    with running(load_repository(str(root), providers="cpu", threads=1)) as (_, port):
        yield path, root / NAME / "1" / "model.onnx", port


def test_crop_pct_round_trips_from_checkpoint_to_server(cropped):
    ckpt_path, onnx_path, port = cropped
    assert zdata.CROP_PCT != 1.0 and load_checkpoint(ckpt_path)["crop_pct"] == zdata.CROP_PCT
    meta = read_metadata(onnx_path)
    assert meta["crop_pct"] == zdata.CROP_PCT
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert decode_metadata(session.get_modelmeta().custom_metadata_map) == meta  # what the server reads
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        (info,) = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest()).models
    assert info.name == NAME and info.crop_pct == pytest.approx(zdata.CROP_PCT)


@pytest.mark.parametrize("hw", [(40, 52), (61, 37)], ids=["landscape", "portrait"])
def test_server_crops_as_the_checkpoint_says(cropped, hw):
    """A non-square image through every image path of the server against PyTorch: the checkpoint's
    model on ``zoo.data.val_transform`` with the checkpoint's crop_pct."""
    ckpt_path, _, port = cropped
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt).eval()
    # Pixel-level noise: each crop sees different pixels, so crop_pct moves the logits well
    # beyond the tolerance (a smooth image would blur the difference).
    pixels = np.random.default_rng(21).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    data = png_bytes(pixels)

    def pytorch(crop_pct: float) -> np.ndarray:
        x = zdata.val_transform(zdata.decode_image(data), ckpt["input_size"], ckpt["mean"], ckpt["std"], crop_pct)
        with torch.no_grad():
            return model(torch.from_numpy(x)[None])[0].numpy()

    want = pytorch(ckpt["crop_pct"])
    tol = 1e-3 * np.abs(want).max()
    # The image is one a crop of 1.0 would read differently: otherwise this test could not tell.
    assert np.abs(pytorch(1.0) - want).max() > 10 * tol, np.abs(pytorch(1.0) - want).max() / tol
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        classify = pb_grpc.ClassifierStub(channel).Classify
        by_image = classify(pb.ClassifyRequest(image=data, return_logits=True)).logits
        by_pixels = classify(tensor_request(pixels, return_logits=True)).logits
        request = kpb.ModelInferRequest(model_name=NAME, raw_input_contents=[pixels[None].tobytes()])
        request.inputs.add(name="input", datatype="UINT8", shape=[1, *pixels.shape])
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    by_kserve = np.frombuffer(response.raw_output_contents[0], "<f4")
    for got in (by_image, by_pixels, by_kserve):
        assert np.abs(np.asarray(got) - want).max() <= tol, (got, want)


# --------------------------------------------------------------------------- what the server refuses at start


def _rewrite_metadata(path, edit) -> None:
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def test_a_bad_metadata_value_stops_loading_naming_file_and_key(copy_repo):
    path = copy_repo / "densenet_mini" / "1" / "model.onnx"
    _rewrite_metadata(path, lambda props: props.update({"zoo.crop_pct": "1.5"}))
    with pytest.raises(RepositoryError) as info:
        load_repository(str(copy_repo), providers="cpu", threads=1)
    assert str(info.value) == f"model file {path}: bad metadata zoo.crop_pct: must be in (0, 1], got 1.5"


def test_onnx_without_zoo_metadata_is_refused_at_start(copy_repo):
    """A plain ONNX model (the same graph, none of the zoo's keys) in the repository: the whole
    stderr of ``python -m serve`` is one line, and it exits 1 without listening."""
    path = copy_repo / "resnext_mini" / "1" / "model.onnx"
    _rewrite_metadata(path, lambda props: [props.pop(k) for k in list(props) if k.startswith(PREFIX)])
    assert not any(p.key.startswith(PREFIX) for p in onnx.load(str(path)).metadata_props)
    result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(copy_repo), "--port", "0",
                             "--threads", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"python -m serve: error: model file {path}: not a zoo export: missing metadata "
                           f"{PREFIX}model, "), line
    assert result.stdout == ""
