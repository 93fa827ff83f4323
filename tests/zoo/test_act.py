"""Selectable activations: one table, every block of both families uses the chosen one, the
weights are initialised for it, and each model trains a step and exports with parity."""
from __future__ import annotations

import math

import onnx
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from export import ExportConfig, export
from export.config import SilentReporter
from zoo.checkpoint import save_checkpoint
from zoo.nn.act import ACTS, get_act_layer
from zoo.registry import create_model, get_model_spec

FAMILIES = ["resnext_mini", "resnext_mini_dw", "densenet_mini", "densenet_mini_dw"]
ACT_TYPES = tuple({type(get_act_layer(a)()) for a in ACTS})
# Functional activations a block could call instead of its module, ignoring the choice.
FUNCTIONAL = {F.relu, torch.relu, torch.relu_, F.gelu, F.silu, torch.sigmoid, torch.tanh}
SIDE = 16  # 4x fewer pixels than the mini models' 32: enough for three stages


def test_every_act_builds_and_an_unknown_one_lists_them():
    for name in ACTS:
        assert isinstance(get_act_layer(name)(), nn.Module)
    for build in (get_act_layer, lambda a: create_model("resnext_mini", act=a)):
        with pytest.raises(ValueError) as e:
            build("nope")
        assert str(e.value) == f"Unknown act 'nope'; choose one of: {', '.join(ACTS)}"


def activation_calls(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The activation modules the traced forward calls (outside attention blocks), and any
    functional activation it calls."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    called = [modules[n.target] for n in graph.nodes if n.op == "call_module"
              and isinstance(modules[n.target], ACT_TYPES) and ".se." not in f".{n.target}."]
    functional = [str(n.target) for n in graph.nodes
                  if (n.op == "call_function" and n.target in FUNCTIONAL)
                  or (n.op == "call_method" and n.target in ("relu", "relu_", "sigmoid", "tanh"))]
    return called, functional


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_block_uses_the_act_and_trains_a_step(name, act):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, act=act)
    want = type(get_act_layer(act)())
    called, functional = activation_calls(model)
    relu_called, _ = activation_calls(create_model(name, num_classes=4))
    # As many activations as the ReLU model, every one the chosen kind, each its own module.
    assert len(called) == len(relu_called) > 0
    assert {type(m) for m in called} == {want}, name
    assert len({id(m) for m in called}) == len(called)
    assert functional == []

    x, y = torch.randn(4, 3, SIDE, SIDE), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model.train()(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if b.dim() > 1)


def _std_ratio(weight: torch.Tensor, expected: float) -> float:
    return weight.std().item() / expected


@pytest.mark.parametrize("family", ["resnext_mini", "densenet_mini"])
def test_init_follows_the_act(family):
    """He for the ReLU family (the fan torchvision uses per family), LeCun for SELU, Glorot for
    sigmoid/tanh: measured on the largest conv, whose std is within a few percent of its target."""
    def largest(model):
        return max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())

    he_fan = "fan_out" if family.startswith("resnext") else "fan_in"
    for act, target in [("relu", "he"), ("gelu", "he"), ("leaky_relu", "leaky"), ("selu", "lecun"),
                        ("sigmoid", "xavier"), ("tanh", "xavier")]:
        torch.manual_seed(0)
        conv = largest(create_model(family, act=act))
        rf = conv.weight[0, 0].numel()
        fan_in, fan_out = conv.in_channels // conv.groups * rf, conv.out_channels * rf
        fan = fan_out if he_fan == "fan_out" else fan_in
        expected = {"he": math.sqrt(2 / fan), "leaky": math.sqrt(2 / (1 + 0.01 ** 2) / fan),
                    "lecun": math.sqrt(1 / fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out))}[target]
        assert abs(_std_ratio(conv.weight, expected) - 1) < 0.05, (family, act)


def _checkpoint(path, name: str, act: str, attn: str | None = None) -> str:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, act=act, attn=attn)
    spec = get_model_spec(name)
    save_checkpoint(path, dict(
        model=model.state_dict(), model_name=name,
        model_args=dict(num_classes=3, norm="bn", gn_groups=32, in_chans=3, act=act, attn=attn, attn_reduction=16),
        classes=["a", "b", "c"], input_size=[3, SIDE, SIDE], mean=list(spec.mean), std=list(spec.std),
        data=None, epoch=1, config=dict(seed=0, val_fraction=0.2)))
    return str(path)


def export_checkpoint(ckpt: str, out) -> object:
    return export(ExportConfig(checkpoint=ckpt, out=str(out), threads=1, latency_runs=0, progress_bars=False,
                               reporter=SilentReporter()))


# The ONNX operators each activation exports to (torch's exporter, opset 18): what proves that
# the exported graph is the checkpoint's activation and not a default.
ONNX_OPS = {"relu": {"Relu"}, "relu6": {"Clip"}, "leaky_relu": {"LeakyRelu"}, "prelu": {"PRelu"}, "elu": {"Elu"},
            "selu": {"Selu"}, "celu": {"Celu"}, "gelu": {"Erf"}, "silu": {"Sigmoid", "Mul"},
            "swish": {"Sigmoid", "Mul"}, "mish": {"Softplus", "Tanh"}, "hardswish": {"HardSwish"},
            "hardsigmoid": {"HardSigmoid"}, "sigmoid": {"Sigmoid"}, "tanh": {"Tanh"}}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", ["resnext_mini", "densenet_mini"])
def test_every_act_exports_with_parity(name, act, tmp_path):
    """The exporter rebuilds the model from the checkpoint's act, folds its BatchNorms and
    verifies onnxruntime against PyTorch (it raises past 1e-4 of the logit scale)."""
    result = export_checkpoint(_checkpoint(tmp_path / "c.pt", name, act), tmp_path / "m")
    assert result.parities and all(p.rel_diff < 1e-4 and p.agreement == 1.0 for p in result.parities)
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert ONNX_OPS[act] <= ops and (act == "relu" or "Relu" not in ops), sorted(ops)


def test_train_records_act_and_attn_and_resume_keeps_them(tmp_path, capsys):
    from zoo.checkpoint import load_checkpoint, model_from_checkpoint
    from zoo.train import main

    out = tmp_path / "run"
    tiny = ["--data", "synthetic", "--batch-size", "32", "--no-progress", "--input-size", str(SIDE), str(SIDE)]
    assert main(tiny + ["--act", "gelu", "--attn", "eca", "--epochs", "1", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["model_args"]["act"], ckpt["model_args"]["attn"]) == ("gelu", "eca")
    assert (ckpt["config"]["act"], ckpt["config"]["attn"]) == ("gelu", "eca")
    model = model_from_checkpoint(ckpt)
    assert any(isinstance(m, nn.GELU) for m in model.modules()) and not any(isinstance(m, nn.ReLU)
                                                                           for m in model.modules())
    capsys.readouterr()
    assert main(["--resume", str(out / "last.pt"), "--epochs", "2", "--act", "tanh", "--no-progress"]) == 0
    assert "--act tanh (checkpoint: gelu)" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["model_args"]["act"] == "gelu"


@pytest.mark.parametrize("argv, message", [
    (["--act", "nope"], "Unknown act 'nope'; choose one of: relu, relu6"),
    (["--attn", "nope"], "Unknown attn 'nope'; choose one of: none, se, eca, cbam"),
    (["--model", "seresnext_mini", "--attn", "none"], "seresnext_mini fixes --attn se; got --attn none"),
])
def test_train_refuses_bad_act_or_attn_in_one_line(argv, message, tmp_path, capsys):
    from zoo.train import main

    assert main(argv + ["--data", "synthetic", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
