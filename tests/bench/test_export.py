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
    assert "ratio = / 'ort folded'" in capsys.readouterr().out


def test_unknown_model_is_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models", "resnxt50"])
    assert info.value.code == 2
    assert "Unknown model 'resnxt50'" in capsys.readouterr().err
