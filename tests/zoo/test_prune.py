"""zoo.prune: whole channels removed, groups and concatenations kept valid, the result a normal
checkpoint that loads without the pruner, exports with a verified parity and is served."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from export.config import ExportConfig, SilentReporter
from export.pipeline import export
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.ready import parse_ready_line
from tests.conftest import randomize_bn_stats
from zoo.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from zoo.flops import count_flops
from zoo.prune import check_structure, kept_units, layer_groups, main, prune_model, pruned_architecture
from zoo.pruned import record as pruned_record
from zoo.registry import count_params, create_model
from zoo.weights import load_weights

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUT_SIZE = (3, 16, 16)
CLASSES = [str(i) for i in range(10)]
# (id, registry name, model arguments beyond num_classes): each family, a depthwise and a GN variant.
VARIANTS = {
    "resnext": ("resnext_mini", dict(norm="bn")),
    "densenet": ("densenet_mini", dict(norm="bn")),
    "resnext_dw": ("resnext_mini_dw", dict(norm="bn")),
    "resnext_gn": ("resnext_mini", dict(norm="gn", gn_groups=4)),
    "seresnext": ("seresnext_mini", dict(norm="bn")),  # SE's 1x1 convs follow the bottleneck's output
}


def _checkpoint(path, name: str, args: dict, seed: int = 0) -> str:
    """An untrained checkpoint on digits; BN statistics randomised so a folding slip shows in the logits."""
    torch.manual_seed(seed)
    model = randomize_bn_stats(create_model(name, num_classes=len(CLASSES), **args))
    save_checkpoint(path, dict(
        model=model.state_dict(), model_name=name, model_args=dict(num_classes=len(CLASSES), in_chans=3, **args),
        classes=CLASSES, input_size=list(INPUT_SIZE), mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0,
        data="digits", epoch=1, best_metric=0.0, config={"seed": 0, "val_fraction": 0.2}))
    return str(path)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """variant -> (source checkpoint, pruned checkpoint), each pruned by the CLI with one fine-tune epoch."""
    work = tmp_path_factory.mktemp("prune")
    out = {}
    for key, (name, args) in VARIANTS.items():
        src = _checkpoint(work / f"{key}.pt", name, args)
        assert main(["--checkpoint", src, "--ratio", "0.5", "--finetune-epochs", "1", "--out", str(work / key),
                     "--no-progress"]) == 0
        out[key] = (src, str(work / key / "best.pt"))
    return out


@pytest.mark.parametrize("key", list(VARIANTS))
def test_pruned_model_is_smaller_reloads_and_exports_verified(pruned, key, tmp_path):
    src, dst = pruned[key]
    before = model_from_checkpoint(load_checkpoint(src))
    after = model_from_checkpoint(load_checkpoint(dst))
    assert count_params(after) < 0.75 * count_params(before)
    assert count_flops(after, INPUT_SIZE) / count_flops(before, INPUT_SIZE) == pytest.approx(0.5, abs=0.03)
    assert after.eval()(torch.zeros(2, *INPUT_SIZE)).shape == (2, len(CLASSES))
    # The group structure survives: grouped convs keep their group count, depthwise stays depthwise,
    # GroupNorm keeps its groups.
    old = dict(before.named_modules())
    for n, m in after.named_modules():
        if isinstance(m, nn.Conv2d) and old[n].groups > 1:
            if old[n].groups == old[n].in_channels == old[n].out_channels:
                assert m.groups == m.in_channels == m.out_channels, n
            else:
                assert m.groups == old[n].groups, n
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == old[n].num_groups and m.num_channels <= old[n].num_channels, n
    # Rounding may leave a layer whole (a grouped conv with one block per group); most shrink.
    norms = [(m.num_channels, old[n].num_channels) for n, m in after.named_modules() if isinstance(m, nn.GroupNorm)]
    assert not norms or sum(a < b for a, b in norms) > len(norms) / 2
    # zoo.load_weights applies the recorded architecture to a freshly built model.
    name, args = VARIANTS[key]
    fresh = load_weights(create_model(name, num_classes=len(CLASSES), **args), dst)
    x = torch.randn(3, *INPUT_SIZE)
    torch.testing.assert_close(fresh.eval()(x), after(x))
    # The export gate compares onnxruntime's logits with the PyTorch model's and raises on a mismatch.
    result = export(ExportConfig(checkpoint=dst, out=str(tmp_path / "m"), threads=1, latency_runs=0,
                                 val_samples=0, progress_bars=False, reporter=SilentReporter()))
    assert result.parities and result.parities[0].agreement == 1.0


def _origins(orig: torch.Tensor, new: torch.Tensor) -> list[int]:
    """For each output row of a pruned conv weight, the original row it was cut from (random
    weights: a value identifies its row)."""
    flat = orig.flatten(1)
    return [int((flat == row.flatten()[0]).any(1).nonzero()[0]) for row in new]


@pytest.mark.parametrize("name", ["resnext_mini", "resnext_mini_dw"])
def test_grouped_conv_keeps_each_channel_in_its_group(name):
    torch.manual_seed(0)
    original = create_model(name, num_classes=10)
    # Unrounded, so that every block's grouped conv loses channels.
    model = prune_model(copy.deepcopy(original), INPUT_SIZE, 0.5, target="channels", round_to=1)
    for block in ("layer1.0", "layer2.0", "layer3.0"):
        o1, o2 = original.get_submodule(f"{block}.conv1"), original.get_submodule(f"{block}.conv2")
        p1, p2 = model.get_submodule(f"{block}.conv1"), model.get_submodule(f"{block}.conv2")
        assert p2.out_channels < o2.out_channels
        inputs = _origins(o1.weight, p1.weight)  # conv2's kept input channels, as original indices
        outputs = _origins(o2.weight, p2.weight)
        g = o2.groups if o2.groups != o2.out_channels else None
        for r, o in enumerate(outputs):
            if g is None:  # depthwise: output r reads input r only
                assert o == inputs[r], (block, r)
                continue
            in_per, out_per = p2.in_channels // g, p2.out_channels // g
            group = r // out_per
            assert o // (o2.out_channels // g) == group, (block, r)
            mine = inputs[group * in_per:(group + 1) * in_per]
            assert all(i // (o2.in_channels // g) == group for i in mine), (block, r)
            within = [i % (o2.in_channels // g) for i in mine]
            torch.testing.assert_close(p2.weight[r], o2.weight[o][within], rtol=0, atol=0)


def test_pruned_checkpoint_loads_without_torch_pruning(pruned):
    code = ("import sys, torch\n"
            "from zoo.checkpoint import load_checkpoint, model_from_checkpoint\n"
            "from zoo.registry import create_model\nfrom zoo.weights import load_weights\n"
            f"path = {pruned['densenet'][1]!r}\n"
            "m = model_from_checkpoint(load_checkpoint(path)).eval()\n"
            "f = load_weights(create_model('densenet_mini', num_classes=10), path).eval()\n"
            "x = torch.randn(1, 3, 16, 16)\nassert torch.equal(m(x), f(x))\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch_pruning', 'zoo.prune')]\n"
            "print(bad)\nsys.exit(1 if bad or 'zoo.prune' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pruned_model_served_by_python_m_serve(pruned, tmp_path):
    from tests.serve.conftest import tensor_request

    root = tmp_path / "models"
    export(ExportConfig(checkpoint=pruned["resnext"][1], out=str(root), threads=1, latency_runs=0, val_samples=0,
                        progress_bars=False, reporter=SilentReporter()))
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(root), "--port", "0", "--no-http",
                             "--threads", "1"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        ready = parse_ready_line(line)
        assert ready is not None, line + proc.stderr.read() if proc.poll() is not None else line
        x = np.random.default_rng(0).standard_normal(INPUT_SIZE).astype(np.float32)
        with grpc.insecure_channel(f"127.0.0.1:{ready.port}") as channel:
            # A bound that only a hang reaches.
            r = pb_grpc.ClassifierStub(channel).Classify(tensor_request(x, top_k=1, return_logits=True), timeout=60)
        model = model_from_checkpoint(load_checkpoint(pruned["resnext"][1])).eval()
        expected = model(torch.from_numpy(x)[None])[0].detach().numpy()
        assert r.classes[0].index == int(expected.argmax())
        np.testing.assert_allclose(np.asarray(r.logits), expected, rtol=1e-3, atol=1e-4)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "Invalid --ratio: 1.5"),
    (["--ratio", "-0.1"], "Invalid --ratio: -0.1"),
    (["--ratio", "0.5", "--finetune-epochs", "-1"], "Invalid --finetune-epochs"),
    (["--ratio", "0.5", "--round-to", "0"], "Invalid --round-to: 0"),
    (["--ratio", "0.5", "--target", "params"], "invalid choice: 'params'"),
])
def test_bad_arguments_are_one_line(pruned, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", pruned["resnext"][0], *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_or_foreign_checkpoint_is_one_line(tmp_path):
    for path, message in ((tmp_path / "nope.pt", "no such checkpoint file"),
                          (tmp_path / "junk.pt", "corrupt or truncated")):
        if path.name == "junk.pt":
            path.write_bytes(b"not a checkpoint")
        result = subprocess.run([sys.executable, "-m", "zoo.prune", "--checkpoint", str(path), "--ratio", "0.5"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_model_the_pruner_cannot_handle_is_one_line(tmp_path, capsys):
    # ECA's 1-D conv slides over the channel axis: there is no channel of its own to remove.
    src = _checkpoint(tmp_path / "eca.pt", "resnext_mini", dict(norm="bn", attn="eca"))
    assert main(["--checkpoint", src, "--ratio", "0.5", "--finetune-epochs", "0", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot prune") and "Conv1d" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "best.pt").exists()


def test_training_starts_from_a_pruned_checkpoint_and_resumes_it(pruned, tmp_path, capsys):
    """--init-weights: the pruned body, a fresh head for the run's classes; every checkpoint of the
    run carries the layer sizes, so --resume and export rebuild the narrow model."""
    from zoo.train import main as train

    _, dst = pruned["resnext"]
    source = model_from_checkpoint(load_checkpoint(dst))
    out = tmp_path / "ft"
    common = ["--no-progress", "--schedule", "none", "--batch-size", "16"]
    assert train(["--init-weights", dst, "--data", "synthetic", "--input-size", "16", "16", "--epochs", "1",
                  "--out", str(out), "--seed", "1", *common]) == 0
    assert "--init-weights" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "last.pt")
    model = model_from_checkpoint(ckpt)
    assert ckpt["pruned"] and len(ckpt["classes"]) == 4 != len(CLASSES)
    narrow = {n: m.weight.shape for n, m in source.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    assert {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))} \
        == narrow
    assert model.fc.in_features == source.fc.in_features and model.fc.out_features == 4
    assert train(["--resume", str(out / "last.pt"), "--epochs", "2", *common]) == 0
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["pruned"] == ckpt["pruned"]
    result = export(ExportConfig(checkpoint=str(out / "last.pt"), out=str(tmp_path / "m"), threads=1, latency_runs=0,
                                 val_samples=0, progress_bars=False, reporter=SilentReporter()))
    assert result.parities and result.parities[0].agreement == 1.0


# --ratio counts FLOPs by default: the widths are chosen so that the model loses that share of its
# FLOPs (a channel ratio would remove about 1 - (1 - c)^2 of them).
@pytest.mark.parametrize("name, ratio", [("resnext_mini", 0.5), ("densenet_mini", 0.5), ("resnext_mini", 0.3)])
def test_ratio_is_the_share_of_flops_removed(name, ratio):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    flops0 = count_flops(model, INPUT_SIZE)
    prune_model(model, INPUT_SIZE, ratio)
    check_structure(model)
    assert count_flops(model, INPUT_SIZE) / flops0 == pytest.approx(1 - ratio, abs=0.03)


def test_channel_target_removes_that_share_of_every_group():
    torch.manual_seed(0)
    original = create_model("resnext_mini", num_classes=10)
    model = prune_model(copy.deepcopy(original), INPUT_SIZE, 0.25, target="channels", round_to=1)
    old = dict(original.named_modules())
    for n in ("layer1.0.conv1", "layer2.0.conv3", "layer3.0.conv2"):
        assert model.get_submodule(n).out_channels == int(old[n].out_channels * 0.75), n


@pytest.mark.parametrize("key", ["resnext", "densenet", "resnext_dw", "resnext_gn"])
@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_keeps_whole_blocks_of_channels(key, round_to):
    """Every pruned conv keeps a multiple of round_to output channels (the layers here are all
    wide enough to allow it); a grouped conv keeps its groups and equal channels per group, a
    multiple of round_to per group where its groups were that wide (onnxruntime's blocked kernels
    take a grouped conv only then). A ratio that lands off the grid without rounding (0.3 of 32
    channels leaves 22.4)."""
    name, args = VARIANTS[key]
    torch.manual_seed(0)
    original = create_model(name, num_classes=10, **args)
    model = prune_model(copy.deepcopy(original), INPUT_SIZE, 0.3, target="channels", round_to=round_to)
    check_structure(model)
    old = dict(original.named_modules())
    changed = 0
    for n, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.out_channels == old[n].out_channels:
            continue
        changed += 1
        assert m.out_channels % round_to == 0, (n, m.out_channels)
        if old[n].groups > 1 and old[n].groups != old[n].out_channels:
            assert m.groups == old[n].groups and m.out_channels % m.groups == 0 and m.in_channels % m.groups == 0, n
            if old[n].out_channels // old[n].groups >= round_to:
                assert (m.out_channels // m.groups) % round_to == 0, (n, m.out_channels)
    assert changed > 0


@pytest.mark.parametrize("key", list(VARIANTS) + ["resnext_in", "densenet_dw"])
def test_planned_architecture_is_what_pruning_builds(key):
    """The FLOPs search counts the architecture worked out from the layer groups, without pruning:
    it must be the one Torch-Pruning then builds, layer for layer."""
    name, args = {**VARIANTS, "resnext_in": ("resnext_mini", dict(norm="in")),
                  "densenet_dw": ("densenet_mini_dw", dict(norm="bn"))}[key]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **args)
    layers = layer_groups(model, INPUT_SIZE)
    keep = kept_units(layers, 0.4, 8)
    planned = pruned_architecture(model, layers, keep)
    prune_model(model, INPUT_SIZE, 0.4, target="channels", round_to=8)
    assert planned == pruned_record(model)


def test_cli_reports_and_records_what_it_removed(tmp_path, capsys):
    src = _checkpoint(tmp_path / "r.pt", "resnext_mini", dict(norm="bn"))
    assert main(["--checkpoint", src, "--ratio", "0.3", "--target", "channels", "--round-to", "1",
                 "--finetune-epochs", "0", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "o" / "best.pt")
    record = ckpt["prune"]
    assert record["target"] == "channels" and record["round_to"] == 1
    before = model_from_checkpoint(load_checkpoint(src))
    after = model_from_checkpoint(ckpt)
    flops = count_flops(after, INPUT_SIZE) / count_flops(before, INPUT_SIZE)
    assert record["flops_ratio"] == pytest.approx(flops)
    assert 0.4 < flops < 0.6  # a channel ratio of 0.3 takes about half the FLOPs, not 0.3 of them
    assert f"removed {1 - flops:.1%} of the FLOPs" in out
