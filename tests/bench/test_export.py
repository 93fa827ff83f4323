import json

import pytest

from bench.export import RUNNERS_BASE, VARIANTS, main


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
