"""Feature extractors: the digit classifier (trained, saved, loaded, resized inputs), the
Inception-v3 adapter (against a stand-in for torch-fidelity), the registry and names."""

import sys
import types

import numpy as np
import pytest
import torch

from flowmatch.evaluation.features import (
    EXTRACTORS,
    DigitClassifier,
    build_extractor,
    extractor_name,
    features_of,
    inception_extractor,
    load_digit_classifier,
)

# ----------------------------------------------------------------------------------------------
# The digit classifier
# ----------------------------------------------------------------------------------------------


def test_digit_classifier_accuracy_and_weights_only_file(digit_classifier):
    path, info = digit_classifier
    assert info["test_accuracy"] > 0.95
    assert (info["image_size"], info["feature_dim"], info["steps"], info["seed"]) == (16, 64, 200, 0)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["image_size"] == 16 and checkpoint["feature_dim"] == 64


def test_digits_extractor_is_the_penultimate_layer_and_resizes(digit_classifier):
    from flowmatch.data.digits import Digits

    path, _ = digit_classifier
    model = load_digit_classifier(path)
    assert isinstance(model, DigitClassifier) and not model.training
    net = build_extractor("digits", weights=path)
    assert (net.name, net.channels) == ("digits", 1)
    x = Digits(16, "test").images[:10]  # (10, 1, 16, 16)
    feats = net(x)
    assert feats.shape == (10, 64) and bool((feats >= 0).all())  # after a ReLU
    torch.testing.assert_close(feats, model.features(x))
    torch.testing.assert_close(net(x.repeat(1, 3, 1, 1)), feats)  # RGB is averaged to grey
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")
    assert net(big).shape == (10, 64)  # resized back to the classifier's 16 px


def test_digit_classifier_shapes_and_size_check():
    model = DigitClassifier(image_size=8, feature_dim=12)
    x = torch.zeros(3, 1, 8, 8)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 12)
    with pytest.raises(ValueError, match="divisible by 4"):
        DigitClassifier(image_size=10)


class _RunsCode:
    """Unpickling this calls a function: what a weights-only load must refuse (never execute)."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CLASSIFIER",))


class _Opaque:
    """A plain class instance: harmless, but still not weights."""


@pytest.mark.parametrize("payload", [_RunsCode(), {"state_dict": _Opaque(), "image_size": 16}],
                         ids=["code", "instance"])
def test_a_classifier_file_holding_objects_is_one_clear_error(tmp_path, monkeypatch, payload):
    from flowmatch.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "EVIL.pt"
    torch.save(payload, evil)
    with pytest.raises(CheckpointError) as e:
        load_digit_classifier(evil)
    message = str(e.value)
    assert message.startswith(f"cannot read digit classifier '{evil}': not a weights file "
                              "readable without executing code")
    assert "weights_only" not in message and len(message.splitlines()) == 1
    assert not (tmp_path / "PWNED_BY_CLASSIFIER").exists()


def test_a_classifier_file_of_the_wrong_kind_names_what_is_missing(tmp_path, digit_classifier):
    from flowmatch.checkpoint import CheckpointError

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, other)
    with pytest.raises(CheckpointError, match=r"^digit classifier '.*other\.pt' lacks 'image_size', "
                                              r"'feature_dim'"):
        load_digit_classifier(other)
    state = torch.load(digit_classifier[0], weights_only=True)
    state["feature_dim"] = 32  # weights of another width
    torch.save(state, other)
    with pytest.raises(CheckpointError, match="its weights do not fit"):
        load_digit_classifier(other)
    torch.save([1, 2], other)
    with pytest.raises(CheckpointError, match="not a classifier saved by train_digit_classifier"):
        load_digit_classifier(other)


# ----------------------------------------------------------------------------------------------
# Registry, names, batching
# ----------------------------------------------------------------------------------------------


def test_registry_unknown_name_and_digits_without_weights():
    assert sorted(EXTRACTORS) == ["digits", "inception"]
    with pytest.raises(ValueError, match="unknown FID extractor 'nope'"):
        build_extractor("nope")
    with pytest.raises(ValueError, match="train_digit_classifier"):
        build_extractor("digits")


def test_extractor_name_prefers_name_then_function_then_class():
    def mean_colour(x):
        return x.mean(dim=(2, 3))

    class Net(torch.nn.Module):
        def forward(self, x):
            return x

    named = Net()
    named.name = "mine"
    assert extractor_name(mean_colour) == "mean_colour"
    assert extractor_name(named) == "mine"
    assert extractor_name(Net()) == "Net"


def test_features_of_batches_give_the_same_float64_features():
    x = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def mean_colour(images):
        calls.append(len(images))
        return images.mean(dim=(2, 3))

    feats = features_of(x, mean_colour, batch_size=4)
    assert calls == [4, 4, 2] and feats.dtype == np.float64 and feats.shape == (10, 3)
    np.testing.assert_allclose(feats, x.mean(dim=(2, 3)).double().numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Inception-v3 adapter, against a stand-in for torch-fidelity
# ----------------------------------------------------------------------------------------------


class _FakeFidelityInception(torch.nn.Module):
    """Records what torch-fidelity's FeatureExtractorInceptionV3 would be given; returns 2048
    features per image that are its mean pixel (so the test can check the pixel conversion)."""

    last_args = None
    last_input = None

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        type(self).last_args = (name, features_list, feature_extractor_weights_path)

    def forward(self, pixels):
        type(self).last_input = pixels
        return (pixels.float().mean(dim=(1, 2, 3))[:, None].repeat(1, 2048),)


@pytest.fixture
def fake_fidelity(monkeypatch):
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = _FakeFidelityInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    return _FakeFidelityInception


def test_inception_adapter_feeds_uint8_rgb(fake_fidelity):
    net = inception_extractor(weights="w.pth")
    assert (net.name, net.channels) == ("inception", 3)
    assert fake_fidelity.last_args == ("inception-v3-compat", ["2048"], "w.pth")
    grey = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)  # 2.0 is clamped to 255
    feats = net(grey)
    pixels = fake_fidelity.last_input
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 2, 2)  # grey repeated to RGB
    assert pixels[0, 2].flatten().tolist() == [0, 128, 255, 255]
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32


def test_inception_without_packages_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        build_extractor("inception")


def test_inception_weights_failure_names_the_file(fake_fidelity, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(sys.modules["torch_fidelity.feature_extractor_inceptionv3"],
                        "FeatureExtractorInceptionV3", refuse)
    with pytest.raises(RuntimeError, match="no network.*pt_inception-2015-12-05"):
        inception_extractor()
