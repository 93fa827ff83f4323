"""python -m bench.latency: conv classification, FLOPs/bytes arithmetic, profile attribution, and
one ``--quick`` run that must produce every column and file. Timings are printed, never asserted.

The run uses ``--threads 1`` (on this shared 2-core machine one thread is several times faster
than two competing with other work) and ``--no-pin-malloc`` (mallopt is process-wide: a CLI may
set it, a test session should not).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bench.latency as lat
from bench import _common as common
from bench import roofline as rl

# --------------------------------------------------------------------------- helpers


def conv_graph(cin: int = 4, cout: int = 8, k: int = 3, group: int = 2, hw: int = 5, relu: bool = False,
               fc: int = 0) -> onnx.ModelProto:
    """input [N, cin, hw, hw] -> Conv(k x k, pad k//2, group) [-> Relu] [-> GlobalAveragePool -> Flatten -> Gemm]."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [cout, cin // group, k, k],
                           rng.standard_normal(cout * cin // group * k * k).astype(np.float32).tolist())
    inits = [w]
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv_out"], name="conv", group=group,
                              kernel_shape=[k, k], pads=[k // 2] * 4)]
    last = "conv_out"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["relu_out"], name="relu"))
        last = "relu_out"
    out_shape: list = ["N", cout, hw, hw]
    if fc:
        fw = helper.make_tensor("fc_w", TensorProto.FLOAT, [fc, cout], [0.1] * (fc * cout))
        inits.append(fw)
        nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
                  helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1)]
        last, out_shape = "logits", ["N", fc]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, hw, hw])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


# --------------------------------------------------------------------------- classification and arithmetic


@pytest.mark.parametrize("group, weight_shape, expected", [
    (1, [64, 64, 3, 3], "dense"),
    (1, [64, 3, 7, 7], "dense"),  # the stem
    (1, [256, 64, 1, 1], "pointwise"),
    (32, [128, 4, 3, 3], "grouped"),  # resnext50 stage 1: 4 channels per group
    (4, [8, 2, 1, 1], "grouped"),  # a grouped 1x1 is grouped, not pointwise
    (128, [128, 1, 3, 3], "depthwise"),
    (64, [128, 1, 3, 3], "depthwise"),  # channel multiplier 2: still one input channel per group
    (1, [8, 1, 3, 3], "dense"),  # one input channel, one group: not depthwise
    (1, [8, 1, 1, 1], "pointwise"),
])
def test_classify_conv(group, weight_shape, expected):
    assert rl.classify_conv(group, weight_shape) == expected


def test_conv_flops_and_bytes_by_hand():
    # Conv 4 -> 8 channels, 3x3, 2 groups, 5x5 (padding keeps 5x5), no bias, batch 2:
    # FLOPs = 2 (MAC) x N 2 x Cout 8 x 25 pixels x (Cin/group 2 x 9 taps) = 14,400
    # bytes = 4 x (input 2*4*25 = 200 + weight 8*2*9 = 144 + output 2*8*25 = 400) = 2,976
    cost = rl.analyze_onnx(conv_graph(), batch=2)
    (op,) = cost.ops
    assert (op.op_class, op.group) == ("grouped", 2)
    assert op.flops == 14_400
    assert op.bytes == 2_976
    assert op.intensity == pytest.approx(14_400 / 2_976)
    # A one-node model moves exactly what its node moves: weights, input read, output written.
    assert cost.weight_bytes == 4 * 144
    assert cost.min_bytes == 2_976
    assert cost.conv_gemm_flops == 14_400
    # Linear in the batch, except the weights.
    one = rl.analyze_onnx(conv_graph(), batch=1)
    assert one.ops[0].flops == 7_200
    assert one.ops[0].bytes == 4 * (100 + 144 + 200)


def test_intermediates_are_written_and_read_once():
    cost = rl.analyze_onnx(conv_graph(relu=True, fc=10), batch=1)
    ops = cost.by_name
    assert [o.op_class for o in cost.ops] == ["grouped", "other", "other", "other", "gemm"]
    act = 8 * 25  # conv_out and relu_out are [1, 8, 5, 5]
    assert ops["relu"].flops == act and ops["relu"].bytes == 4 * 2 * act
    assert ops["gap"].flops == act  # one add per input element
    assert ops["flat"].flops == 0
    assert ops["fc"].flops == 2 * 1 * 10 * 8  # 2 x M x N x K
    weights = 8 * 2 * 9 + 10 * 8
    # input read once; conv_out, relu_out, gap, flat written once and read once; logits written once
    activations = 4 * 25 + 2 * (act + act + 8 + 8) + 10
    assert cost.min_bytes == 4 * (weights + activations)
    assert cost.conv_gemm_flops == 2 * 8 * 25 * 18 + 160


def test_onnx_flops_match_zoo_flops_on_a_mini_model():
    import torch

    from export.onnx import export_model
    from zoo.flops import count_flops
    from zoo.nn import fold_batchnorm
    from zoo.registry import create_model, get_model_spec

    name = "densenet_mini_dw"
    size = get_model_spec(name).input_size
    model = create_model(name).eval()
    with torch.no_grad():
        proto = export_model(fold_batchnorm(model), size, 17, "torchscript")
    cost = rl.analyze_onnx(proto, batch=3)
    assert cost.conv_gemm_flops == 3 * count_flops(model, size, 1)
    classes = {o.op_class for o in cost.ops}
    assert {"depthwise", "pointwise", "dense", "gemm", "other"} <= classes


def test_roofline_arithmetic():
    c = rl.Ceilings(peak_gflops=160.0, bandwidth_gbps=20.0, detail={})
    assert c.ridge == 8.0
    assert c.roof(2.0) == 40.0  # memory-bound: bandwidth x intensity
    assert c.roof(100.0) == 160.0  # compute-bound
    best = rl.Ceilings.best(c, rl.Ceilings(150.0, 25.0, {"x": 1.0}, cache_gbps=60.0, cpu_cores=1.5))
    assert (best.peak_gflops, best.bandwidth_gbps, best.cache_gbps, best.cpu_cores) == (160.0, 25.0, 60.0, 1.5)


# --------------------------------------------------------------------------- profile attribution


def _event(name: str, op: str, dur: float, ts: float) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "ts": ts, "args": {"op_name": op}}


def test_profile_maps_fused_and_nchwc_nodes_back(tmp_path):
    graph = rl.analyze_onnx(conv_graph(relu=True, fc=10), batch=1)
    runs = []
    for i, conv_us in enumerate((100.0, 300.0, 200.0)):  # median per node: 200
        t = 1000.0 * i
        runs.append([
            _event("relu_out_nchwc", "Conv", conv_us, t + 1),  # Conv+Relu fused, named after the ReLU's output
            _event("ReorderOutput", "ReorderOutput", 10.0, t + 2),  # layout change: maps to nothing
            _event("gap", "GlobalAveragePool", 5.0, t + 3),
            _event("fc", "Gemm", 7.0, t + 4),
        ])
    trace = [{"cat": "Session", "name": "model_run", "ts": 1000.0 * i, "dur": 500.0} for i in range(4)]
    trace += [e for r in runs for e in r]
    trace += [_event("fc", "Gemm", 1e6, 3001)]  # a warm-up run, dropped below
    trace.sort(key=lambda e: e["ts"])
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    parsed = rl.profile_runs(str(path), skip_runs=0)
    assert [len(r) for r in parsed] == [4, 4, 4, 1]
    prof = rl.attribute_profile(rl.profile_runs(str(path), skip_runs=0)[:3], graph)
    assert prof.runs == 3
    assert prof.time_us["grouped"] == 200.0
    assert prof.time_us["gemm"] == 7.0
    assert prof.time_us["other"] == 15.0  # the pool and the unmapped reorder
    assert prof.unmapped_us == 10.0 and prof.reorder_us == 10.0
    assert prof.total_us == 222.0
    assert prof.layouts == {"conv": "nchwc"}
    assert prof.nchwc_convs(graph, "grouped") == (1, 1)
    # The fused ReLU has no kernel of its own: its FLOPs join the conv's class, its traffic vanishes.
    ops = graph.by_name
    assert prof.flops["grouped"] == ops["conv"].flops + ops["relu"].flops
    assert prof.bytes["grouped"] == ops["conv"].bytes
    assert prof.nodes["other"] == 3  # relu, gap, flat as exported


# --------------------------------------------------------------------------- timing helpers (no timing asserted)


def _edited(path, **props) -> None:
    """Rewrite the zoo.* metadata of the ONNX file at ``path``: a value replaces, None removes."""
    m = onnx.load(path)
    kept = [(p.key, p.value) for p in m.metadata_props if p.key.removeprefix("zoo.") not in props]
    kept += [(f"zoo.{k}", v) for k, v in props.items() if v is not None]
    del m.metadata_props[:]
    for key, value in kept:
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, path)


def test_latency_and_serve_share_one_export_cache_and_one_staleness_check(tmp_path):
    """bench.latency exports in its process, bench.serve in a subprocess, into one cache: what one
    wrote the other takes as it is; an entry that is not a current random-weight export of its
    name is exported again, replacing the old file whole."""
    import shutil

    from bench.serve.config import Config
    from bench.serve.servers import ensure_model

    name, cache = "resnext_mini", str(tmp_path / "cache")
    path = lat.ensure_exported(name, cache, 1)
    assert path == common.cached_export(cache, name) == f"{cache}/{name}/1/model.onnx"
    assert common.cache_problem(path, name) is None and os.path.isfile(f"{cache}/{name}/labels.txt")

    def signature() -> tuple[int, int]:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns

    first = signature()
    cfg = Config(model=name, model_dir=None, cache=cache, server=None, threads=1, concurrency=[1], duration_s=1,
                 batching=["on"], workers=[1], client_processes=1, rounds=1, max_requests=1, seed=0, json_path=None)
    assert ensure_model(cfg) == os.path.abspath(cache) and lat.ensure_exported(name, cache, 1) == path
    assert signature() == first  # current for both: neither exported again

    probe = str(tmp_path / "probe.onnx")
    for edit, reason in [(dict(flops=None), "exported before zoo.flops existed"),
                         (dict(model="densenet_mini"), "zoo.model is 'densenet_mini', not 'resnext_mini'"),
                         (dict(version="2"), "zoo.version is 2, not 1"),
                         (dict(source="checkpoint:x.pt sha256:00"), "zoo.source is 'checkpoint:x.pt sha256:00'"),
                         (dict(precision="int8"), "zoo.precision is 'int8', not 'fp32'")]:
        shutil.copyfile(path, probe)
        _edited(probe, **edit)
        assert reason in common.cache_problem(probe, name), edit
    with open(probe, "wb") as f:
        f.write(b"not a model")
    assert common.cache_problem(probe, name).startswith("unreadable")
    assert common.cache_problem(str(tmp_path / "none.onnx"), name) == "absent"

    _edited(path, flops=None)  # an export older than zoo.flops
    assert lat.ensure_exported(name, cache, 1) == path
    assert common.cache_problem(path, name) is None and signature() != first
    assert os.listdir(cache) == [name]  # the export's working directory is gone


def test_median_and_percentile():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert math.isnan(common.median([]))
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(np.percentile([1, 2, 3, 4, 5], 90))


def test_interleaved_rotates_and_gives_every_config_its_runs():
    calls: list[str] = []
    configs = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    out = common.interleaved(configs, runs=6, rounds=3, warmup=1)
    assert all(len(s.times_ms) >= 6 and len(s.faults) == len(s.times_ms) for s in out.values())
    timed = calls[3:]  # after one warm-up call each
    starts = [timed[i] for i in range(0, len(timed), len(timed) // 3)]
    assert len(set(starts)) > 1, "every round started with the same configuration"


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnext_nope"], "Unknown model"),
    (["--batch", "0"], "--batch"),
    (["--batch", "x"], "--batch"),
    (["--providers", "tpu"], "--providers"),
    (["--threads", "0"], "--threads"),
    (["--runs", "0"], "--runs"),
])
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        lat.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_output_fails_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        lat.main(["--quick", "--json", str(blocker / "out.json")])
    assert e.value.code == 2
    assert "--json" in capsys.readouterr().err


MODEL_KEYS = ("params", "flops", "bytes", "intensity", "latency_ms", "latency_p90_ms", "gflops", "peak_fraction",
              "roof_fraction", "torch_latency_ms", "ort_over_torch", "torch_faults_per_call")


def test_quick_run_writes_every_column_and_file(tmp_path, capsys):
    paths = {k: tmp_path / f"out.{k}" for k in ("json", "md", "png")}
    code = lat.main(["--quick", "--batch", "1,2", "--threads", "1", "--no-pin-malloc", "--no-progress",
                     "--cache", str(tmp_path / "models"), "--json", str(paths["json"]),
                     "--markdown", str(paths["md"]), "--plot", str(paths["png"]), "--note", "test run"])
    out = capsys.readouterr().out
    print(out)  # the timings, for whoever reads the log
    assert code == 0

    rows = json.loads(paths["json"].read_text())
    assert all(set(r) == set(lat.ROW_KEYS) for r in rows)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"env", "ceiling", "model", "twin", "op", "sweep"}
    for key in ("flops", "intensity", "gflops", "latency_ms", "peak_fraction"):
        assert key in rows[0]

    models = [r for r in rows if r["kind"] == "model"]
    assert {(r["model"], r["batch"]) for r in models} == {(m, b) for m in lat.QUICK_MODELS for b in (1, 2)}
    for r in models:
        assert all(r[k] is not None for k in MODEL_KEYS), r
        assert r["flops"] > 0 and r["bytes"] > 0 and r["latency_ms"] > 0
        assert r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["latency_ms"] / 1e6)
    one = {r["model"]: r for r in models if r["batch"] == 1}
    two = {r["model"]: r for r in models if r["batch"] == 2}
    assert all(two[m]["flops"] == 2 * one[m]["flops"] for m in one)

    twins = [r for r in rows if r["kind"] == "twin"]
    assert {(r["model"], r["twin"]) for r in twins} == {("resnext_mini_dw", "resnext_mini"),
                                                        ("densenet_mini_dw", "densenet_mini")}
    for r in twins:
        assert r["flops_ratio"] < 1
        assert r["gap"] == pytest.approx(r["latency_ratio"] / r["flops_ratio"])

    ops = [r for r in rows if r["kind"] == "op"]
    assert {r["op_class"] for r in ops} == {"depthwise", "grouped", "pointwise", "dense", "gemm", "other"}
    for (m, b) in {(r["model"], r["batch"]) for r in ops}:
        shares = [r["time_share"] for r in ops if r["model"] == m and r["batch"] == b]
        assert sum(shares) == pytest.approx(1.0)
    dw = [r for r in ops if r["op_class"] == "depthwise"]
    assert dw and all(r["intensity"] < 3 and r["gflops"] > 0 for r in dw)

    sweep = [r for r in rows if r["kind"] == "sweep"]
    assert sorted({r["groups"] for r in sweep}) == sorted(lat.QUICK_SWEEP["groups"])
    c = lat.QUICK_SWEEP["channels"]
    assert {r["op_class"] for r in sweep if r["groups"] == c} == {"depthwise"}
    assert {r["op_class"] for r in sweep if r["groups"] == 1} == {"dense"}
    for r in sweep:
        assert r["flops_ratio"] == pytest.approx(1 / r["groups"])
        assert r["latency_ms"] > 0 and r["torch_latency_ms"] > 0

    assert {r["name"] for r in rows if r["kind"] == "ceiling"} >= {"peak (best matmul)", "bandwidth (best copy)"}

    md = paths["md"].read_text()
    for section in ("## How it was measured", "## Machine ceilings", "## Models", "## The gap in one number",
                    "## Where the time goes", "## One convolution", "## Why depthwise runs slower",
                    "**1. Arithmetic intensity", "**2. The GEMM shapes", "**3. Per-group loop overhead",
                    "**4. Cache behaviour", "**5. In whole networks", "## Roofline", "test run",
                    "a multiply-add as 2 FLOPs", "python -m bench.latency --quick"):
        assert section in md, section
    assert "](out.png)" in md

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size[0] > 500 and im.size[1] > 400

    for header in ("== machine ceilings", "== models", "== depthwise vs dense twin", "== per operator class",
                   "== sweep", "ort/torch", "gap (ort)", "time share"):
        assert header in out, header
    assert "threads: onnxruntime intra_op=1" in out


def _report(load_start: str, load_end: str, cores: str = "2") -> lat.Report:
    env = {"command": "python -m bench.latency", "started": "now", "versions": "v", "machine": "m", "nice": "0",
           "load_start": load_start, "load_end": load_end, "threads_n": "2", "threads": "2", "malloc": "pinned",
           "timing": "medians"}
    ceil = rl.Ceilings(peak_gflops=100.0, bandwidth_gbps=10.0, detail={}, cpu_cores=2.0)
    return lat.Report(env=env, ceil=ceil, models=[], twins=[], ops=[], sweep=[], machine={"cores": cores})


@pytest.mark.parametrize("start, end, warned", [("0.10 0.1 0.1", "0.40 0.3 0.2", False),
                                                ("0.10 0.1 0.1", "2.06 1.4 1.1", False),  # its own 2 threads
                                                ("1.20 0.5 0.2", "0.40 0.3 0.2", True),
                                                ("0.10 0.1 0.1", "3.50 3.0 1.0", True)])
def test_a_recorded_document_warns_when_the_machine_was_busy(start, end, warned):
    # Half the cores, not all: on 2 cores a 1-minute load above 1 means another process held a core;
    # at the end the run's own 2 threads are part of the load and do not count.
    md = _report(start, end).markdown()
    assert ("Warning: recorded on a busy machine" in md) is warned
    assert ("**the machine was shared**" in md) is warned
