"""GetLatencyReport for a depthwise variant served beside its dense twin: FLOPs from the export's
metadata, and the FLOPs ratio, inference latency ratio and gap as bench.latency defines them.

resnext_mini_dw (registry twin: resnext_mini) is exported here; resnext_mini comes from the
session's repository. Only relations between the report's own figures are asserted, never a time.
"""
from __future__ import annotations

import math
import os
import shutil
import urllib.request

import grpc
import numpy as np
import onnx
import pytest
import torch

import export.onnx as exp
from contract.metadata import read_metadata
from contract.repository import model_file
from serve import client
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import load_repository
from tests.conftest import randomize_bn_stats
from tests.serve.conftest import CLASSES, INPUT_SIZE, MEAN, STD, running, tensor_request
from zoo.checkpoint import save_checkpoint
from zoo.flops import count_flops
from zoo.registry import create_model, get_model_spec

DW, TWIN = "resnext_mini_dw", "resnext_mini"
REQUESTS = 6


def _strip_new_keys(path: str) -> None:
    """Rewrite an export as one made before zoo.flops and zoo.dense_twin existed."""
    model = onnx.load(path)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in ("zoo.flops", "zoo.dense_twin")]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def dw_export(exported, tmp_path_factory) -> str:
    """A model directory of resnext_mini_dw, exported like the session's models."""
    assert get_model_spec(DW).dense_twin == TWIN
    work = tmp_path_factory.mktemp("dw-export")
    torch.manual_seed(7)
    model = randomize_bn_stats(create_model(DW, num_classes=len(CLASSES)))
    path = str(work / f"{DW}.pt")
    save_checkpoint(path, dict(
        model=model.state_dict(), model_name=DW,
        model_args=dict(num_classes=len(CLASSES), norm="bn", gn_groups=32, in_chans=3),
        classes=CLASSES, input_size=INPUT_SIZE, mean=MEAN, std=STD, crop_pct=1.0, data="digits",
        epoch=1, best_metric=0.0, config={}))
    code = exp.main([DW, "--checkpoint", path, "--out", str(work / "models"), "--threads", "1", "--no-progress",
                     "--val-samples", "0", "--latency-runs", "0"])
    assert code == 0, f"export of {DW} failed"
    return str(work / "models" / DW)


def _repository(tmp_path, exported, dw_export, twin_as: str | None = TWIN, old: bool = False) -> str:
    """A repository with the depthwise export (``old``: without the new keys) and, unless
    ``twin_as`` is None, the session's resnext_mini under the name ``twin_as``."""
    root = tmp_path / "models"
    shutil.copytree(dw_export, root / DW)
    if twin_as is not None:
        shutil.copytree(os.path.join(exported.root, TWIN), root / twin_as)
    if old:
        _strip_new_keys(model_file(str(root / DW), 1))
    return str(root)


def _send(stub, *models: str) -> None:
    x = np.random.default_rng(0).standard_normal(INPUT_SIZE).astype(np.float32)
    for _ in range(REQUESTS):
        for name in models:
            stub.Classify(tensor_request(x, model=name), timeout=30)


def _report(stub, model: str = "") -> dict[str, pb.ModelLatency]:
    return {m.model: m for m in stub.GetLatencyReport(pb.LatencyReportRequest(model=model), timeout=30).models}


def _expected_flops(name: str) -> int:
    return count_flops(create_model(name, num_classes=len(CLASSES)), tuple(INPUT_SIZE))


def test_export_stamps_flops_and_dense_twin(exported, dw_export):
    dw = read_metadata(model_file(dw_export, 1))
    twin = read_metadata(model_file(os.path.join(exported.root, TWIN), 1))
    assert dw["flops"] == _expected_flops(DW) and dw["dense_twin"] == TWIN
    assert twin["flops"] == _expected_flops(TWIN) and "dense_twin" not in twin  # a dense model has no twin


def test_flops_are_counted_at_the_exported_input_size(tmp_path):
    code = exp.main([DW, "--num-classes", "3", "--input-size", "16", "24", "--out", str(tmp_path), "--threads", "1",
                     "--no-progress", "--val-samples", "0", "--latency-runs", "0"])
    assert code == 0
    meta = read_metadata(model_file(str(tmp_path / DW), 1))
    assert meta["flops"] == count_flops(create_model(DW, num_classes=3), (3, 16, 24)) < _expected_flops(DW)


def test_report_gives_flops_and_the_gap_against_the_served_twin(tmp_path, capsys, exported, dw_export):
    repo = load_repository(_repository(tmp_path, exported, dw_export), providers="cpu", threads=1)
    with running(repo, metrics_port=0) as (server, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        before = _report(stub)[DW]  # no requests yet: the FLOPs ratio is known, the latency ratio is not
        assert before.twin_model == TWIN and before.flops_ratio > 0 and before.latency_ratio == 0 and before.gap == 0
        _send(stub, DW, TWIN)
        report = _report(stub)
        dw, twin = report[DW], report[TWIN]
        assert dw.flops == _expected_flops(DW) and twin.flops == _expected_flops(TWIN)
        assert dw.dense_twin == TWIN and dw.twin_model == TWIN
        assert dw.count == twin.count == REQUESTS
        assert math.isclose(dw.flops_ratio, dw.flops / twin.flops, rel_tol=1e-12)
        assert dw.flops_ratio < 1  # depthwise 3x3 convs do fewer FLOPs than grouped ones: a count, not a time
        assert math.isclose(dw.latency_ratio, dw.inference.p50_us / twin.inference.p50_us, rel_tol=1e-12)
        assert math.isclose(dw.gap, dw.latency_ratio / dw.flops_ratio, rel_tol=1e-12)
        # The dense twin is compared with nothing.
        assert (twin.dense_twin, twin.twin_model, twin.flops_ratio, twin.latency_ratio, twin.gap) == ("", "", 0, 0, 0)
        # Asked for the variant alone, the report still compares it with its twin (same windows, same figures).
        (alone,) = _report(stub, DW).values()
        assert (alone.flops_ratio, alone.latency_ratio, alone.gap) == (dw.flops_ratio, dw.latency_ratio, dw.gap)

        scrape = server.metrics.registry.get_sample_value
        assert scrape("zoo_serve_model_flops", {"model": DW, "version": "1"}) == dw.flops
        assert scrape("zoo_serve_model_flops", {"model": TWIN, "version": "1"}) == twin.flops
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        assert f'zoo_serve_model_flops{{model="{DW}",version="1"}}' in text

        assert client.main(["--latency-report", "--server", f"127.0.0.1:{port}"]) == 0
    out = capsys.readouterr().out
    header, _rule, *rows = out.splitlines()
    assert "GFLOPs" in header and "FLOPs ratio" in header and "latency ratio" in header and "gap" in header
    (dw_row,) = [r for r in rows if r.startswith(DW + " ")]
    cells = dw_row.split()
    assert cells[-4:] == [TWIN, f"{dw.flops_ratio:.3f}", f"{dw.latency_ratio:.3f}", f"{dw.gap:.2f}x"]
    assert f"{dw.flops / 1e9:.3f}" in cells and "gap = latency ratio / FLOPs ratio" in out


def test_twin_served_under_another_name_is_found_by_its_export(tmp_path, exported, dw_export):
    repo = load_repository(_repository(tmp_path, exported, dw_export, twin_as="baseline"), providers="cpu", threads=1)
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        _send(stub, DW, "baseline")
        report = _report(stub)
    dw, base = report[DW], report["baseline"]
    assert dw.dense_twin == TWIN and dw.twin_model == "baseline"
    assert math.isclose(dw.latency_ratio, dw.inference.p50_us / base.inference.p50_us, rel_tol=1e-12)


def test_twin_not_served_gives_flops_and_no_ratios(tmp_path, capsys, exported, dw_export):
    repo = load_repository(_repository(tmp_path, exported, dw_export, twin_as=None), providers="cpu", threads=1)
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _send(pb_grpc.ClassifierStub(channel), DW)
        (dw,) = _report(pb_grpc.ClassifierStub(channel)).values()
        assert client.main(["--latency-report", "--server", f"127.0.0.1:{port}"]) == 0
    assert dw.flops == _expected_flops(DW) and dw.dense_twin == TWIN
    assert (dw.twin_model, dw.flops_ratio, dw.latency_ratio, dw.gap) == ("", 0, 0, 0)
    assert f"{TWIN} (not served)" in capsys.readouterr().out


def test_export_without_the_new_keys_still_serves_and_reports_no_flops(tmp_path, exported, dw_export):
    repo = load_repository(_repository(tmp_path, exported, dw_export, old=True), providers="cpu", threads=1)
    with running(repo, metrics_port=0) as (server, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        _send(stub, DW, TWIN)
        report = _report(stub)
        scrape = server.metrics.registry.get_sample_value
        assert scrape("zoo_serve_model_flops", {"model": DW, "version": "1"}) is None  # absent, not a false 0
        assert scrape("zoo_serve_model_flops", {"model": TWIN, "version": "1"}) == report[TWIN].flops
    dw = report[DW]
    assert dw.count == REQUESTS and dw.flops == 0 and dw.dense_twin == ""
    assert (dw.twin_model, dw.flops_ratio, dw.latency_ratio, dw.gap) == ("", 0, 0, 0)


def test_client_cli_latency_report_arguments(capsys):
    for argv, message in ((["--latency-report", "x.png"], "--latency-report classifies nothing"),
                          ([], "required: IMAGE (or --latency-report)")):
        with pytest.raises(SystemExit) as e:
            client.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
