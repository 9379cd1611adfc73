"""Config schema: strict keys, types, impossible values, overrides, round trip."""

from pathlib import Path

import pytest
import yaml

from flowmatch.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name):
    if name.startswith("vae_"):  # VAE fine-tuning has its own schema
        from flowmatch.config import load_dataclass
        from flowmatch.training.vae import VAEFinetuneConfig

        raw = yaml.safe_load((ROOT / "configs" / name).read_text())
        loaded = config_to_dict(load_dataclass(VAEFinetuneConfig, ROOT / "configs" / name))
        assert {k: loaded[k] for k in raw} == raw
        return
    cfg = load_config(ROOT / "configs" / name)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_defaults_are_filled_in_for_tagged_sections():
    cfg = config_from_dict({"model": {"arch": "mlp"}, "data": {"kind": "toy2d", "name": "moons"}})
    assert cfg.model.params["hidden"] > 0  # MLPConfig default filled in
    assert cfg.data.params == {"name": "moons", "n": 100_000, "seed": 0}
    assert cfg.path.scheduler == "linear" and "sigma_min" in cfg.path.params


def test_required_constructor_arguments_are_named():
    with pytest.raises(ConfigError, match=r"^data\.name: required for kind 'toy2d'"):
        config_from_dict({"data": {"kind": "toy2d"}})


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["train.steps=500", "model.arch=mlp", "train.betas=[0.9, 0.95]",
                               "name=abc"])
    cfg = config_from_dict(raw)
    assert cfg.train.steps == 500 and cfg.train.betas == (0.9, 0.95) and cfg.name == "abc"


def test_int_widens_to_float_but_not_the_reverse():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        config_from_dict({"train": {"steps": 1.5}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trian": {"steps": 1}}, r"^trian: unknown key"),
        ({"train": {"stpes": 1}}, r"^train\.stpes: unknown key"),
        ({"model": {"arch": "unet", "base_chanels": 8}}, r"^model\.base_chanels: unknown key"),
        ({"model": {"arch": "transformer"}}, r"^model\.arch: unknown value 'transformer'"),
        ({"data": {"kind": "toy2d", "image_size": 8}}, r"^data\.image_size: unknown key"),
        ({"path": {"scheduler": "cosine", "sigma_min": 0.1}}, r"^path\.sigma_min: unknown key"),
        ({"train": {"time_sampler": {"name": "logit_normal", "mu": 0}}}, r"train\.time_sampler\.mu"),
    ],
)
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"steps": "many"}}, r"^train\.steps: expected an integer"),
        ({"train": {"lr": "fast"}}, r"^train\.lr: expected a number"),
        ({"data": {"hflip": "yes"}}, r"^data\.hflip: expected true or false"),
        ({"model": {"arch": "unet", "channel_mults": 3}}, r"^model\.channel_mults: expected a list"),
        ({"train": {"betas": [0.9]}}, r"^train\.betas: expected 2 values"),
        ({"train": "fast"}, r"^train: expected a mapping"),
    ],
)
def test_wrong_types_are_named(raw, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"steps": 0}}, r"^train\.steps"),
        ({"train": {"lr": -1.0}}, r"^train\.lr"),
        ({"train": {"ema_decay": 1.0}}, r"^train\.ema_decay"),
        ({"train": {"lr_schedule": "step"}}, r"^train\.lr_schedule"),
        ({"sample": {"method": "rk45"}}, r"^sample\.method: unknown solver 'rk45' \(valid: .*euler"),
        ({"sample": {"grid": "weird"}}, r"^sample\.grid"),
        ({"train": {"label_dropout": 0.1}}, r"^train\.label_dropout: needs model\.class_cond"),
        ({"path": {"scheduler": "linear", "sigma_min": 2.0}}, r"^path"),
    ],
)
def test_impossible_values_are_named(raw, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_run_dir_default():
    assert Config(name="abc").run_dir == Path("runs/abc")


def test_model_values_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"^model: .*pos_embed"):
        config_from_dict({"model": {"arch": "dit", "pos_embed": "abs"}})
    with pytest.raises(ConfigError, match=r"^data\.shape"):
        config_from_dict({"data": {"kind": "digits", "shape": [1, 16]}})


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4".
    assert config_from_dict(yaml.safe_load("train: {lr: 1e-4}")).train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        config_from_dict({"train": {"lr": "1e-4x"}})
