import pytest
import torch

from training.models import get_model
from training.strategies import apply_strategy, backbone_layers, parse_strategy, train_mode
from utils import UserError


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def model():
    m, _ = get_model("efficientnet_lite0", 10, weights="none", input_size=32)
    return m


def test_frozen_trains_exactly_the_head(model):
    apply_strategy(model, "frozen")
    assert _trainable(model) == {f"head.{n}" for n, _ in model.head.named_parameters()}


def test_full_trains_everything(model):
    apply_strategy(model, "full")
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("n", [1, 5, 30])
def test_last_n_trains_head_and_last_n_layers(model, n):
    apply_strategy(model, "last", n)
    layers = backbone_layers(model)
    unfrozen = [i for i, layer in enumerate(layers)
                if any(p.requires_grad for p in layer.parameters(recurse=False))]
    assert unfrozen == list(range(len(layers) - n, len(layers)))
    expected = {f"head.{k}" for k, _ in model.head.named_parameters()}
    names = {id(p): k for k, p in model.named_parameters()}
    for layer in layers[-n:]:
        expected |= {names[id(p)] for p in layer.parameters(recurse=False)}
    assert _trainable(model) == expected


def test_last_n_beyond_depth_is_an_error(model):
    with pytest.raises(UserError, match="only"):
        apply_strategy(model, "last", 10_000)


def test_parse_and_two_phase_schedule():
    assert parse_strategy("last-90").n == 90
    two = parse_strategy("two-phase")
    assert [two.phase(e, 2) for e in range(4)] == ["frozen", "frozen", "full", "full"]
    for bad in ("last-0", "last-x", "partial"):
        with pytest.raises(UserError, match="frozen, full, last-N"):
            parse_strategy(bad)


def test_frozen_batchnorm_keeps_its_statistics(model):
    apply_strategy(model, "frozen")
    before = model.backbone.net._bn0.running_mean.clone()
    train_mode(model)
    assert not model.backbone.training and model.head.training
    model(torch.randn(8, 3, 32, 32) * 3 + 1)
    torch.testing.assert_close(model.backbone.net._bn0.running_mean, before)
    apply_strategy(model, "last", 3)
    train_mode(model)
    assert not model.backbone.net._bn0.training  # frozen early BN stays in eval
    assert model.backbone.net._bn1.training  # unfrozen last BN trains
