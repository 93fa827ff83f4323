"""``.safetensors`` weights (timm's format) load through zoo.load_weights and --init-weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zoo import WeightsError, create_model, load_weights
from zoo.weights import read_weights


def _model(seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("seresnext_mini", num_classes=10, act="prelu", **kw)


@pytest.mark.parametrize("filename", ["weights.safetensors", "weights.bin"])
def test_round_trip(tmp_path, filename):
    """Every tensor comes back bit for bit (PReLU slopes and SE weights included); the format is
    recognised by its content, whatever the file is called."""
    source = _model(0).eval()
    path = tmp_path / filename
    save_file(source.state_dict(), str(path))
    target = _model(1).eval()
    assert not torch.equal(target.layer1[0].se.fc1.weight, source.layer1[0].se.fc1.weight)
    load_weights(target, path)
    assert target.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    assert read_weights(path)[1] == {}  # a safetensors file says nothing of its model


def test_head_false_and_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_model(0).state_dict(), str(path))
    torch.manual_seed(2)
    mine = create_model("seresnext_mini", num_classes=3, act="prelu")
    fresh_head = mine.fc.weight.detach().clone()
    load_weights(mine, path, head=False)
    assert torch.equal(mine.fc.weight, fresh_head)
    assert torch.equal(mine.layer2[0].se.fc2.weight, _model(0).layer2[0].se.fc2.weight)
    with pytest.raises(WeightsError, match=r"does not fit ResNet: 12 unexpected: layer1.0.se.fc1.bias"):
        load_weights(create_model("resnext_mini", num_classes=10, act="prelu"), path)


def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_model(0).state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"w.safetensors: not a readable safetensors file") as e:
        load_weights(_model(0), path)
    assert "\n" not in str(e.value)


def test_init_weights_reads_safetensors(tmp_path, capsys):
    from zoo.checkpoint import load_checkpoint
    from zoo.train import main

    source = _model(0)
    path = tmp_path / "timm-style.safetensors"
    save_file(source.state_dict(), str(path))
    out = tmp_path / "run"
    assert main(["--model", "seresnext_mini", "--act", "prelu", "--init-weights", str(path), "--data", "synthetic",
                 "--epochs", "1", "--batch-size", "32", "--no-progress", "--input-size", "16", "16",
                 "--out", str(out)]) == 0
    assert f"--init-weights {path}: loaded" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["model_args"]["act"] == "prelu"
