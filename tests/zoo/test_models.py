import json

import pytest
import torch
from torch import nn

from tests.conftest import FULL_MODELS, MINI_MODELS, mini_input
from tests.zoo import torchvision_reference as tvref
from zoo import WeightsError, count_params, create_model, get_model_spec, list_models, load_weights
from zoo.checkpoint import load_checkpoint
from zoo.models.resnext import Bottleneck

TORCHVISION_PARAMS = {
    "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336, "resnext101_64x4d": 83_455_272,
    "resnet50": 25_557_032, "densenet121": 7_978_856, "densenet161": 28_681_000,
    "densenet169": 14_149_480, "densenet201": 20_013_928,
}


@pytest.fixture(scope="module")
def reference():
    with open(tvref.PATH) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_fidelity(name, reference):
    """Same keys, shapes, parameter count and outputs as torchvision (recorded reference)."""
    model = create_model(name)
    assert count_params(model) == TORCHVISION_PARAMS[name] == reference[name]["params"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == reference[name]["keys"]
    logits = tvref.reference_logits(create_model(name, num_classes=10))
    expected = torch.tensor(reference[name]["logits"], dtype=torch.float64)
    # float64; summation order varies with thread count, so not bit-exact across runs
    assert torch.allclose(logits, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", MINI_MODELS)
def test_mini_models_are_small_and_run_at_32x32(name):
    model = create_model(name, num_classes=10)
    assert count_params(model) < 1_000_000
    assert get_model_spec(name).input_size == (3, 32, 32)
    assert model(mini_input(name)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in FULL_MODELS if n not in TORCHVISION_PARAMS])
def test_full_depthwise_models_forward(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_depthwise_variants_have_depthwise_3x3():
    for name in [n for n in list_models() if n.endswith("_dw")]:
        spec = get_model_spec(name)
        assert spec.dense_twin in list_models()
        convs3 = [m for m in create_model(name).modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                  and m.in_channels > 3]
        assert convs3 and all(m.groups == m.in_channels == m.out_channels for m in convs3), name
        if spec.family == "densenet":  # depthwise 3x3 then pointwise 1x1 -> growth rate
            layer = create_model(name).features.denseblock1.denselayer1
            assert isinstance(layer.conv2, nn.Sequential) and layer.conv2[1].kernel_size == (1, 1)


def test_aliases_and_unknown_names():
    assert count_params(create_model("resnext50")) == TORCHVISION_PARAMS["resnext50_32x4d"]
    assert get_model_spec("resnext101").name == "resnext101_32x8d"
    with pytest.raises(ValueError, match="did you mean: .*resnext50"):
        create_model("resnxt50")
    with pytest.raises(ValueError, match="choose one of: densenet121"):
        create_model("vgg16")
    with pytest.raises(ValueError, match="Unknown norm 'bx'; choose one of: bn, gn, ln, in"):
        create_model("resnext_mini", norm="bx")


def test_factory_refuses_contradicting_fixed_arguments():
    with pytest.raises(ValueError, match="resnext50_32x4d fixes groups=32; got groups=8"):
        create_model("resnext50_32x4d", groups=8)
    with pytest.raises(ValueError, match="norm_layer is set by create_model itself"):
        create_model("resnext_mini", norm_layer=nn.BatchNorm2d)
    # Restating a fixed value is fine; a free argument passes through.
    assert create_model("resnext_mini", groups=4, zero_init_residual=True) is not None


def test_in_chans_and_norms_build():
    for norm in ("bn", "gn", "ln", "in"):
        for name in ("resnext_mini", "densenet_mini"):
            model = create_model(name, num_classes=4, norm=norm, in_chans=1)
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_seed_bottleneck_parameter_counts():
    """at 256 channels in and out, ResNet's bottleneck (width 64) has 69,632 conv
    weights and ResNeXt 32x4d's (width 128) has 70,144."""
    def conv_weights(block):
        return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    assert conv_weights(Bottleneck(256, 64)) == 1 * 1 * 256 * 64 + 3 * 3 * 64 * 64 + 1 * 1 * 64 * 256 == 69_632
    assert conv_weights(Bottleneck(256, 64, groups=32, width_per_group=4)) == 70_144


def test_seed_three_equivalent_resnext_forms():
    """(a) 32 branches 1x1->3x3->1x1 summed, (b) the branches' 3x3 outputs
    concatenated then one 1x1, (c) one grouped conv, are one function when weights are shared."""
    torch.manual_seed(0)
    cardinality, d, cin, cout = 32, 4, 256, 256
    width = cardinality * d
    reduce = nn.Conv2d(cin, width, 1, bias=False)
    grouped = nn.Conv2d(width, width, 3, padding=1, groups=cardinality, bias=False)
    expand = nn.Conv2d(width, cout, 1, bias=False)
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    reduce, grouped, expand = reduce.double(), grouped.double(), expand.double()

    form_c = expand(torch.relu(grouped(torch.relu(reduce(x)))))

    branches = []
    for b in range(cardinality):
        sl = slice(b * d, (b + 1) * d)
        h1 = torch.relu(nn.functional.conv2d(x, reduce.weight[sl]))
        h3 = torch.relu(nn.functional.conv2d(h1, grouped.weight[sl], padding=1))
        branches.append(h3)
    form_a = sum(nn.functional.conv2d(h3, expand.weight[:, b * d:(b + 1) * d]) for b, h3 in enumerate(branches))
    form_b = expand(torch.cat(branches, 1))

    assert torch.allclose(form_a, form_c, atol=1e-10)
    assert torch.allclose(form_b, form_c, atol=1e-10)


def test_densenet_memory_efficient_matches():
    torch.manual_seed(0)
    plain = create_model("densenet_mini", num_classes=5)
    efficient = create_model("densenet_mini", num_classes=5, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    out_p, out_e = plain(x), efficient(x)
    out_p.sum().backward()
    out_e.sum().backward()
    assert torch.allclose(out_p, out_e, atol=1e-5)
    for (n, p), q in zip(plain.named_parameters(), efficient.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), n


def test_load_weights_round_trip_and_layouts(tmp_path):
    src = create_model("resnext_mini", num_classes=10)
    dst = create_model("resnext_mini", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    src.eval(), dst.eval()

    bare = tmp_path / "bare.pth"  # a torchvision-style bare state_dict
    torch.save(src.state_dict(), bare)
    assert torch.equal(load_weights(dst, bare)(x), src(x))

    ckpt = tmp_path / "ckpt.pt"  # our checkpoint layout, saved from DistributedDataParallel
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, ckpt)
    assert torch.equal(load_weights(create_model("resnext_mini", num_classes=10).eval(), ckpt)(x), src(x))


def test_load_weights_names_mismatches(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_model("densenet_mini", num_classes=10).state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing: conv1.weight.*unexpected: features"):
        load_weights(create_model("resnext_mini", num_classes=10), path)
    torch.save(create_model("resnext_mini", num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match=r"shape mismatch \(file vs model\): fc.weight \(3, 256\) vs \(10, 256\)"):
        load_weights(create_model("resnext_mini", num_classes=10), path)


@pytest.mark.parametrize("name, head_prefix", [("resnext_mini", "fc."), ("densenet_mini", "classifier.")])
def test_load_weights_without_head_fine_tunes_to_new_classes(tmp_path, name, head_prefix):
    """ImageNet-style weights (1000 classes) into a 10-class model: the body is loaded, the new head kept."""
    torch.manual_seed(0)
    src = create_model(name)  # 1000 classes
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = create_model(name, num_classes=10)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(head_prefix)}
    with pytest.raises(WeightsError, match="shape mismatch"):  # strict by default
        load_weights(dst, path)
    load_weights(dst, path, head=False)
    for k, v in dst.state_dict().items():
        want = head_before[k] if k.startswith(head_prefix) else src.state_dict()[k]
        assert torch.equal(v, want), k
    assert set(head_before) == {head_prefix + "weight", head_prefix + "bias"}


def test_load_weights_refuses_corrupt_and_code(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pt: not a readable weights file"):
        load_weights(create_model("resnext_mini"), bad)
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(create_model("resnext_mini"), tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"  # weights_only=True refuses arbitrary objects
    torch.save({"model": create_model("resnext_mini").state_dict(), "hook": print}, evil)
    with pytest.raises(WeightsError, match="evil.pt: not a readable weights file"):
        load_weights(create_model("resnext_mini"), evil)


@pytest.mark.parametrize("content,reason", [
    (b"not a checkpoint", "not a PyTorch file"),
    (b"", "the file ends early"),
    ("half", "not a whole zip archive"),
    ("code", "a Python object (print)"),
])
def test_unreadable_weights_are_one_line_without_torchs_unsafe_advice(tmp_path, content, reason):
    """torch's message advises ``weights_only=False``, which would run the file's code."""
    path = tmp_path / "garbage.pt"
    if content == "half":
        torch.save(create_model("resnext_mini").state_dict(), path)
        content = path.read_bytes()[:2000]
    elif content == "code":
        torch.save({"model": create_model("resnext_mini").state_dict(), "hook": print}, path)
        content = path.read_bytes()
    path.write_bytes(content)
    for load, what in ((lambda: load_weights(create_model("resnext_mini"), path), "not a readable weights file"),
                       (lambda: load_checkpoint(path), "corrupt or truncated checkpoint")):
        with pytest.raises(WeightsError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{path}: {what} (") and reason in message, message
        assert "\n" not in message and "weights_only" not in message and "\x1b" not in message, message


def test_load_weights_reads_torchvision_legacy_densenet_names(tmp_path):
    """torchvision's DenseNet .pth files say ``norm.1`` where the modules say ``norm1``."""
    src = create_model("densenet_mini", num_classes=10).eval()
    legacy = {k.replace("norm1", "norm.1").replace("conv2", "conv.2") if "denselayer" in k else k: v
              for k, v in src.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_weights(create_model("densenet_mini", num_classes=10).eval(), path)(x), src(x))


# --- head API (timm's): forward_features, forward_head, get_classifier, reset_classifier ------------
TORCHVISION_HEAD = {"resnext": "fc", "densenet": "classifier"}


@pytest.mark.parametrize("name", MINI_MODELS)
def test_head_api_splits_forward_at_the_torchvision_classifier(name):
    model = create_model(name, num_classes=7).eval()
    x = mini_input(name)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        logits = model(x)
    assert features.dim() == 4 and features.shape[1] == model.num_features
    assert pre.shape == (2, model.num_features)
    assert torch.equal(model.forward_head(features), logits)
    head = model.get_classifier()
    assert head is dict(model.named_modules())[TORCHVISION_HEAD[get_model_spec(name).family]]
    assert isinstance(head, nn.Linear) and head.out_features == model.num_classes == 7
    assert torch.equal(head(pre), logits)


@pytest.mark.parametrize("name", MINI_MODELS)
def test_reset_classifier_replaces_only_the_head(name):
    model = create_model(name, num_classes=7).double().eval()
    body = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(body)
    x = mini_input(name).double()
    model.reset_classifier(3)
    assert list(model.state_dict()) == keys  # torchvision's names, so checkpoints still load
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == model.num_classes == 3
    assert head.weight.dtype == torch.float64  # the model's dtype, not the default
    prefix = TORCHVISION_HEAD[get_model_spec(name).family] + "."
    for k, v in model.state_dict().items():
        if not k.startswith(prefix):
            assert torch.equal(v, body[k]), k
    assert model(x).shape == (2, 3)

    model.reset_classifier(0)  # no head: the model gives its pooled features
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="Invalid num_classes: -1"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", MINI_MODELS)
def test_load_weights_finds_the_head_through_get_classifier(tmp_path, name):
    """A feature extractor (reset_classifier(0), no Linear left) loads a classifier's body."""
    src = create_model(name)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = create_model(name)
    dst.reset_classifier(0)
    load_weights(dst, path, head=False)
    own = dst.state_dict()
    assert own and all(torch.equal(v, src.state_dict()[k]) for k, v in own.items())
