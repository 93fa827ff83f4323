import contextlib
import io
import json
import re

import numpy as np
import pytest

from bench.export import (INT8_TARGETS, KIND_DEPTHWISE, KIND_GROUP1, KIND_GROUPED, KIND_KEPT, KIND_QDQ, KIND_UNTRACED,
                          RUNNERS_BASE, VARIANTS, main, profile_int8)


def test_quick_run_writes_every_runner_and_variant(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--models", "resnext_mini", "--batch", "1", "--runs", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    timing = [r for r in rows if "runner" in r]
    files = {r["variant"]: r for r in rows if "variant" in r}
    assert {r["runner"] for r in timing} >= {RUNNERS_BASE, "ort unfolded", "ort int8", "eager folded"}
    assert all(r["median_ms"] > 0 and {"p90_ms", "faults_per_call", "ratio_vs_folded"} <= r.keys() for r in timing)
    assert next(r for r in timing if r["runner"] == RUNNERS_BASE)["ratio_vs_folded"] == 1.0
    assert set(files) == set(VARIANTS)
    assert files["int8"]["file_bytes"] < files["fp16"]["file_bytes"] < files["folded"]["file_bytes"]
    out = capsys.readouterr().out
    assert "ratio = / 'ort folded'" in out
    # the graph audit of every export: fp32 all float, int8 all integer but what it kept fp32
    assert files["folded"]["audit"]["integer_convs"] == 0 and files["folded"]["int8"] is None
    audit, int8 = files["int8"]["audit"], files["int8"]["int8"]
    assert audit["float_convs"] == len(int8["excluded"]) and audit["integer_convs"] > 0
    assert int8["activations"] == "uint8" and "onnxruntime graph after its optimisations" in out
    int8_ratio = next(r for r in timing if r["runner"] == "ort int8")["ratio_vs_folded"]
    assert f"resnext_mini           1 {int8_ratio:>10.2f}" in out  # the int8/fp32 table


def test_runners_subset_exports_only_what_they_need(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--models", "densenet_mini", "--batch", "2", "--runs", "1", "--threads", "1", "--runners", "ort int8",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["runner"] for r in rows if "runner" in r} == {RUNNERS_BASE, "ort int8"}
    assert [r["variant"] for r in rows if "variant" in r] == ["folded", "int8"]
    assert "exporting densenet_mini fp16" not in capsys.readouterr().out


def test_unknown_runner_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models", "resnext_mini", "--runners", "ort int4"])
    assert info.value.code == 2
    assert "unknown runner 'ort int4'" in capsys.readouterr().err


def test_unknown_model_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models", "resnxt50"])
    assert info.value.code == 2
    assert "Unknown model 'resnxt50'" in capsys.readouterr().err


# --- what bounds int8: onnxruntime's per-op profile ------------------------------------------------
INTEGER_KINDS = (KIND_GROUP1, KIND_DEPTHWISE, KIND_GROUPED)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """Both mini models (no int8 target) profiled at batch 1: (int8 timing row, export rows by variant, stdout)
    per model."""
    out = tmp_path_factory.mktemp("profile") / "rows.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["--models", "resnext_mini,densenet_mini", "--batch", "1", "--runs", "1", "--threads", "1",
                     "--runners", "ort int8", "--profile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    return {m: (next(r for r in rows if r.get("runner") == "ort int8" and r["model"] == m),
                {r["variant"]: r for r in rows if r.get("variant") and r["model"] == m}, text.getvalue())
            for m in ("resnext_mini", "densenet_mini")}


def _kinds(prof):
    return {k["kind"]: k for k in prof["kinds"]}


def grouped_convs(name):
    """The model's convs with groups of more than one channel."""
    import torch

    from zoo.registry import create_model

    return sum(1 for m in create_model(name).modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.in_channels // m.groups > 1)


@pytest.mark.parametrize("model", ["resnext_mini", "densenet_mini"])
def test_profile_kinds_add_up_to_the_profiled_total(profiled, model):
    prof = profiled[model][0]["profile"]
    assert prof["batch"] == 1 and prof["runs"] == 1 and prof["int8_total_ms"] > 0 and prof["fp32_total_ms"] > 0
    assert sum(k["int8_ms"] for k in prof["kinds"]) == pytest.approx(prof["int8_total_ms"], rel=1e-9)
    assert sum(k["fp32_ms"] for k in prof["kinds"]) == pytest.approx(prof["fp32_total_ms"], rel=1e-9)
    # shares of the int8 total, not of the fp32 one
    assert sum(k["share"] for k in prof["kinds"]) == pytest.approx(1.0)
    for k in prof["kinds"]:
        assert k["share"] == pytest.approx(k["int8_ms"] / prof["int8_total_ms"])
    # the printed table adds up too, to its rounding (3 decimals per cell)
    out = profiled[model][2]
    table = out.split(f"where the int8 time goes, {model} batch 1 (no int8 target)")[1].split("bound:")[0]
    cells = {line.split("  ")[1].strip(): line.split() for line in table.splitlines()[2:] if line.strip()}
    int8_ms = [float(c[-5]) for kind, c in cells.items() if kind != "total"]
    assert set(cells) == {k["kind"] for k in prof["kinds"]} | {"total"}
    assert sum(int8_ms) == pytest.approx(float(cells["total"][-5]), abs=0.0005 * len(int8_ms) + 1e-9)


@pytest.mark.parametrize("model", ["resnext_mini", "densenet_mini"])
def test_profile_kinds_match_the_optimised_graph(profiled, model):
    row, files, _ = profiled[model]
    kinds, audit, fp32_audit = _kinds(row["profile"]), files["int8"]["audit"], files["folded"]["audit"]
    # every conv onnxruntime runs as an integer op is in one integer kind, every float one kept fp32
    assert sum(kinds[k]["int8_nodes"] for k in INTEGER_KINDS if k in kinds) == audit["integer_convs"]
    assert kinds.get(KIND_KEPT, {}).get("int8_nodes", 0) == audit["float_convs"]
    assert kinds[KIND_QDQ]["int8_nodes"] == audit["quantize"] + audit["dequantize"]
    # every fp32 conv (and BatchNormalization the int8 export runs as a depthwise conv) traced to its int8 node
    assert KIND_UNTRACED not in kinds
    fp32_convs = sum(kinds[k]["fp32_nodes"] for k in (*INTEGER_KINDS, KIND_KEPT) if k in kinds)
    assert fp32_convs == fp32_audit["float_convs"] + fp32_audit["ops"].get("BatchNormalization", 0)
    grouped = kinds.get(KIND_GROUPED, {}).get("int8_nodes", 0)
    if model == "resnext_mini":  # its grouped 3x3s: integer, or kept fp32 where int8 measured slower
        assert grouped + kinds.get(KIND_KEPT, {}).get("int8_nodes", 0) == grouped_convs(model) == 3
    else:  # DenseNet has no grouped convs; its pre-activation BatchNorms run as depthwise convs in int8
        assert grouped == 0 and kinds[KIND_DEPTHWISE]["int8_nodes"] > 0


@pytest.mark.parametrize("model", ["resnext_mini", "densenet_mini"])
def test_bound_names_the_largest_kind(profiled, model):
    row, _, out = profiled[model]
    prof = row["profile"]
    top = max(prof["kinds"], key=lambda k: k["int8_ms"])
    assert prof["bound"].startswith(f"bound: {top['kind']}")
    assert f", {100 * top['share']:.0f}% of the int8 time, {top['int8_ms'] / top['fp32_ms']:.1f}x their fp32 time" \
        in prof["bound"]
    assert prof["bound"] in out


def test_bound_with_a_target_names_the_kind_furthest_over_it():
    """resnext50_32x4d's profile at batch 1 (bench.export, 2 threads): its group=1 int8 convs are the
    largest kind but already at 0.3x their fp32 time; the grouped ones, at 1.1x, keep it over 0.5x."""
    from bench.export import bound_of

    kinds = [dict(kind=KIND_GROUP1, int8_ms=14.589, fp32_ms=49.197, share=0.477),
             dict(kind=KIND_GROUPED, int8_ms=8.546, fp32_ms=7.569, share=0.279),
             dict(kind=KIND_KEPT, int8_ms=4.171, fp32_ms=4.821, share=0.136),
             dict(kind=KIND_QDQ, int8_ms=1.016, fp32_ms=0.0, share=0.033)]
    assert bound_of(kinds, 0.5, [8, 16, 32]) == (
        f"bound: {KIND_GROUPED} (8, 16, 32 channels per group), 28% of the int8 time, 1.1x their fp32 time; "
        "4.8 ms over what 0.5x their fp32 time allows")
    assert bound_of(kinds, None).startswith(f"bound: {KIND_GROUP1}, 48% of the int8 time, 0.3x")


def test_model_without_target_prints_no_verdict(profiled):
    row, _, out = profiled["densenet_mini"]
    assert row["target"] is None and row["target_met"] is None
    table = out.split("int8/fp32  ")[1].split("\n\n")[0]  # the int8/fp32 table, from its header on
    line = next(line for line in table.splitlines() if line.startswith("densenet_mini "))
    assert "met" not in line and "missed" not in line and line.split()[3] == "-"


def test_missed_target_is_profiled_unasked_and_met_is_not(tmp_path, capsys, monkeypatch):
    # targets no run can miss and no run can meet
    monkeypatch.setitem(INT8_TARGETS, "resnext_mini", 1e-6)
    monkeypatch.setitem(INT8_TARGETS, "densenet_mini", 1e6)
    out = tmp_path / "rows.json"
    assert main(["--models", "resnext_mini,densenet_mini", "--batch", "1", "--runs", "1", "--threads", "1",
                 "--runners", "ort int8", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text()) if r.get("runner") == "ort int8"}
    text = capsys.readouterr().out
    missed, met = rows["resnext_mini"], rows["densenet_mini"]
    assert missed["target_met"] is False and missed["profile"]["bound"].startswith("bound: ")
    assert met["target_met"] is True and met["profile"] is None
    assert re.search(r"resnext_mini +1 +[\d.]+ +<= 0\.00 missed", text)
    assert re.search(r"densenet_mini +1 +[\d.]+ +<= 1000000\.00 met", text)
    assert "where the int8 time goes, resnext_mini batch 1 (int8 missed its target)" in text
    assert "where the int8 time goes, densenet_mini" not in text


def test_profile_traces_convs_kept_fp32(tmp_path):
    """Convs the int8 export keeps fp32 run as NCHWc convs named after their output tensor: still traced."""
    from export import ExportConfig, export
    from export.config import SilentReporter

    results = {}
    for precision in ("fp32", "int8"):
        extra = dict(calib_data="synthetic", calib_samples=32, int8_exclude="Conv") if precision == "int8" else {}
        results[precision] = export(ExportConfig(
            model="resnext_mini", out=str(tmp_path), name=f"m-{precision}", version=1, threads=1, latency_runs=0,
            precision=precision, progress_bars=False, reporter=SilentReporter(), **extra))
    audit = results["int8"].audit
    assert audit.float_convs > 0
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    kinds = _kinds(profile_int8(results["int8"].path, results["fp32"].path, x, 1, 1, str(tmp_path)))
    assert kinds[KIND_KEPT]["int8_nodes"] == audit.float_convs
    assert sum(kinds[k]["int8_nodes"] for k in INTEGER_KINDS if k in kinds) == audit.integer_convs
    assert KIND_UNTRACED not in kinds
    assert sum(kinds[k]["fp32_nodes"] for k in (*INTEGER_KINDS, KIND_KEPT) if k in kinds) == 13


def test_profile_without_int8_runner_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models", "resnext_mini", "--runners", "ort fp16", "--profile"])
    assert info.value.code == 2
    assert "--profile profiles the 'ort int8' runner" in capsys.readouterr().err


def test_ort_profile_times_every_node_of_the_graph_it_ran(tmp_path):
    """The profile's nodes are the optimised graph's, by name, over the runs asked (the warm-up left out)."""
    import torch

    from bench.ort_profile import profile
    from zoo.experiments.attention import export_onnx
    from zoo.registry import create_model

    path = str(tmp_path / "m.onnx")
    torch.manual_seed(0)
    export_onnx(create_model("resnext_mini"), (3, 32, 32), path)
    x = {"input": np.zeros((2, 3, 32, 32), dtype=np.float32)}
    prof = profile(path, x, threads=1, runs=3, workdir=str(tmp_path), warmup=1, graph=True)
    assert prof.runs == 3
    assert sorted(n.name for n in prof.nodes) == sorted(n.name for n in prof.graph.graph.node)
    assert {n.op for n in prof.nodes} == {n.op_type for n in prof.graph.graph.node}
    assert prof.total_ms == pytest.approx(sum(prof.by_op.values())) and all(n.ms > 0 for n in prof.nodes)
