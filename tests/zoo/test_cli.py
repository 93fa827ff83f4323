import subprocess
import sys

from zoo.__main__ import main


def test_list_prints_the_table(capsys):
    assert main(["list", "resnext50", "resnext_mini_dw"]) == 0
    out = capsys.readouterr().out
    assert "resnext50_32x4d" in out and "25,028,904" in out and "8.461" in out
    assert "resnext_mini_dw" in out and "resnext_mini" in out  # the dense twin column
    assert "multiply-add counts as 2 FLOPs" in out


def test_unknown_model_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "zoo", "list", "resnxt50"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: Unknown model 'resnxt50'; did you mean: "
                                                "resnext50, resnet50, resnext50_dw, resnext101?"]
