"""Training survives being killed: checkpoints on disk are whole or absent, never half-written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from zoo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from zoo.train import main

ARGS = ["--data", "synthetic", "--batch-size", "8", "--no-progress", "--seed", "5", "--schedule", "none"]


def _epochs(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "zoo.train", *ARGS, "--epochs", "30", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_epochs(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(_epochs(out)) >= 2, proc.stderr.read() if proc.poll() is not None else "too slow"
        time.sleep(0.3)  # well into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = load_checkpoint(out / "last.pt")  # whole, checksum verified
    assert done["epoch"] >= 2
    assert main(["--resume", str(out / "last.pt"), "--epochs", str(done["epoch"] + 2), "--out", str(out),
                 "--no-progress"]) == 0
    assert _epochs(out) == list(range(1, done["epoch"] + 3))
    assert load_checkpoint(out / "last.pt")["epoch"] == done["epoch"] + 2
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(ARGS + ["--epochs", "1", "--out", str(out)]) == 0
    before = (out / "last.pt").read_bytes()
    ckpt = load_checkpoint(out / "last.pt")

    def crash(*_):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out / "last.pt", dict(ckpt, epoch=99))
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == before
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_last_checkpoint_is_named_and_best_survives(tmp_path, damage, capsys):
    out = tmp_path / "run"
    assert main(ARGS + ["--epochs", "2", "--out", str(out)]) == 0
    data = bytearray((out / "last.pt").read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # flip bytes inside the weights: the zip still opens, the checksum does not match
        ckpt = load_checkpoint(out / "last.pt")
        key = next(k for k, v in ckpt["model"].items() if v.numel() > 64 and v.is_floating_point())
        raw = ckpt["model"][key].numpy().tobytes()
        at = data.find(raw[:64])
        assert at > 0
        data[at + 8] ^= 0xFF
    (out / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt: (corrupt or truncated|checksum mismatch)"):
        load_checkpoint(out / "last.pt")
    assert main(["--resume", str(out / "last.pt"), "--epochs", "3", "--out", str(out)]) == 2
    assert "last.pt" in capsys.readouterr().err
    best = load_checkpoint(out / "best.pt")
    assert main(["--resume", str(out / "best.pt"), "--epochs", str(best["epoch"] + 1), "--out", str(out),
                 "--no-progress"]) == 0
