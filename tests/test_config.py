"""Config: the strict schema (flowmatch.config), resolving by the registries
(flowmatch.components.experiment_from_dict / load_experiment), overrides, round trips, and the CLI's
promise: every bad value stops with one line naming the dotted key, exit code 2, before any work."""

import ast
from pathlib import Path

import pytest
import yaml

from flowmatch.cli import main
from flowmatch.components import experiment_from_dict, load_experiment, resolve_config
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
TOY = str(ROOT / "configs" / "toy2d.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name):
    vae_schemas = {"vae_finetune.yaml": "VAEFinetuneConfig", "digits_vae.yaml": "VAETrainConfig"}
    if name in vae_schemas:  # VAE training (train-vae / finetune-vae) has its own schema
        from flowmatch.config import load_dataclass
        from flowmatch.training import vae_config

        raw = yaml.safe_load((ROOT / "configs" / name).read_text())
        loaded = config_to_dict(load_dataclass(getattr(vae_config, vae_schemas[name]), ROOT / "configs" / name))
        assert {k: loaded[k] for k in raw if k != "data"} == {k: v for k, v in raw.items() if k != "data"}
        assert {**raw.get("data", {})}.items() <= {**loaded.get("data", {}), **loaded.get("data", {}).get(
            "params", {})}.items()
        return
    cfg = load_experiment(ROOT / "configs" / name)
    again = experiment_from_dict(yaml.safe_load(dump_config(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)
    # the strict load alone round-trips too, and resolving it gives the same config
    strict = load_config(ROOT / "configs" / name)
    assert config_to_dict(config_from_dict(yaml.safe_load(dump_config(strict)))) == config_to_dict(strict)
    assert config_to_dict(resolve_config(strict)) == config_to_dict(cfg)


def test_config_module_is_a_leaf():
    tree = ast.parse((ROOT / "flowmatch" / "config.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "flowmatch"]


def test_strict_load_keeps_tagged_extras_raw():
    # The schema knows no registry: names and extra keys pass, unchecked, into params ...
    raw = {"model": {"arch": "transformer", "width": "wide"}, "train": {"coupling": {"name": "x", "k": 1}}}
    cfg = config_from_dict(raw)
    assert cfg.model.arch == "transformer" and cfg.model.params == {"width": "wide"}
    assert cfg.train.coupling.params == {"k": 1}
    assert config_from_dict({}).model.params == {}
    # ... and resolving is where they are checked.
    with pytest.raises(ConfigError, match=r"^model\.arch: unknown value 'transformer' \(valid: dit, mlp, unet\)"):
        resolve_config(cfg)


def test_defaults_are_filled_in_for_tagged_sections():
    cfg = experiment_from_dict({"model": {"arch": "mlp"}, "data": {"kind": "toy2d", "name": "moons"}})
    assert cfg.model.params["hidden"] > 0  # MLPConfig default filled in
    assert cfg.data.params == {"name": "moons", "n": 100_000, "seed": 0}
    assert cfg.path.scheduler == "linear" and "sigma_min" in cfg.path.params
    assert cfg.train.time_sampler.params == {} and cfg.train.coupling.params == {}


def test_resolve_is_idempotent_and_leaves_its_input_alone():
    strict = config_from_dict({"model": {"arch": "unet", "channel_mults": [1, 2]},
                               "path": {"scheduler": "vp", "beta_max": 5}})
    once = resolve_config(strict)
    assert strict.model.params == {"channel_mults": [1, 2]}  # not modified
    assert once.model.params["channel_mults"] == (1, 2)  # coerced to the annotation's tuple
    assert once.path.params == {"beta_max": 5.0, "beta_min": 0.1}
    assert isinstance(once.path.params["beta_max"], float)
    twice = resolve_config(once)
    assert twice == once and twice is not once


def test_required_constructor_arguments_are_named():
    with pytest.raises(ConfigError, match=r"^data\.name: required for kind 'toy2d'"):
        experiment_from_dict({"data": {"kind": "toy2d"}})


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["train.steps=500", "model.arch=mlp", "train.betas=[0.9, 0.95]",
                               "name=abc"])
    cfg = config_from_dict(raw)
    assert cfg.train.steps == 500 and cfg.train.betas == (0.9, 0.95) and cfg.name == "abc"


def test_int_widens_to_float_but_not_the_reverse():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        config_from_dict({"train": {"steps": 1.5}})


# (raw, message, caught by the schema alone?)  Every row fails resolving; schema rows fail the strict
# load already, registry rows pass it.
BAD = [
    # unknown keys
    ({"trian": {"steps": 1}}, r"^trian: unknown key", True),
    ({"train": {"stpes": 1}}, r"^train\.stpes: unknown key", True),
    ({"model": {"arch": "unet", "base_chanels": 8}}, r"^model\.base_chanels: unknown key for arch 'unet'", False),
    ({"model": {"arch": "transformer"}}, r"^model\.arch: unknown value 'transformer'", False),
    ({"data": {"kind": "toy2d", "image_size": 8}}, r"^data\.image_size: unknown key", False),
    ({"data": {"kind": "folder", "root": "x", "image_size": 8, "random_flip": True}},
     r"^data\.random_flip: unknown key", False),  # set by the trainer (data.hflip), not the config
    ({"path": {"scheduler": "cosine", "sigma_min": 0.1}}, r"^path\.sigma_min: unknown key", False),
    ({"train": {"time_sampler": {"name": "logit_normal", "mu": 0}}}, r"^train\.time_sampler\.mu", False),
    # wrong types
    ({"train": {"steps": "many"}}, r"^train\.steps: expected an integer", True),
    ({"train": {"lr": "fast"}}, r"^train\.lr: expected a number", True),
    ({"data": {"hflip": "yes"}}, r"^data\.hflip: expected true or false", True),
    ({"model": {"arch": "unet", "channel_mults": 3}}, r"^model\.channel_mults: expected a list", False),
    ({"train": {"betas": [0.9]}}, r"^train\.betas: expected 2 values", True),
    ({"train": "fast"}, r"^train: expected a mapping", True),
    ({"model": {"arch": 3}}, r"^model\.arch: expected a string", True),
    # impossible values
    ({"train": {"steps": 0}}, r"^train\.steps: must be >= 1", True),
    ({"train": {"lr": -1.0}}, r"^train\.lr", True),
    ({"train": {"ema_decay": 1.0}}, r"^train\.ema_decay", True),
    ({"train": {"lr_schedule": "step"}}, r"^train\.lr_schedule", True),
    ({"train": {"label_dropout": 0.1}}, r"^train\.label_dropout: needs model\.class_cond", True),
    ({"data": {"kind": "digits", "shape": [1, 16]}}, r"^data\.shape", True),
    ({"sample": {"method": "rk45"}}, r"^sample\.method: unknown solver 'rk45' \(valid: .*euler", False),
    ({"sample": {"grid": "weird"}}, r"^sample\.grid: unknown grid", False),
    ({"sample": {"steps": 0}}, r"^sample\.steps: must be >= 1", False),
    ({"sample": {"rtol": 0.0}}, r"^sample\.rtol: must be > 0", False),
    ({"sample": {"grid_shift": 2.0}}, r"^sample\.grid_shift: only used with the 'shifted' grid", False),
    ({"path": {"scheduler": "linear", "sigma_min": 2.0}}, r"^path\.sigma_min: must be in \[0, 1\)", False),
    ({"path": {"scheduler": "vp", "beta_min": 5.0, "beta_max": 1.0}}, r"^path: need 0 <= beta_min", False),
    ({"model": {"arch": "dit", "pos_embed": "abs"}}, r"^model\.pos_embed: must be one of", False),
    ({"model": {"arch": "mlp", "depth": 0}}, r"^model\.depth: must be >= 1, got 0", False),
    ({"train": {"time_sampler": {"shift": 0.0}}}, r"^train\.time_sampler\.shift: must be > 0", False),
    ({"train": {"time_sampler": {"name": "logit_normal", "std": 0}}}, r"^train\.time_sampler\.std: must be > 0", False),
]


@pytest.mark.parametrize("raw, key, schema", BAD)
def test_bad_values_are_named(raw, key, schema):
    with pytest.raises(ConfigError, match=key) as e:
        experiment_from_dict(raw)
    assert len(str(e.value).splitlines()) == 1
    if schema:
        with pytest.raises(ConfigError, match=key):
            config_from_dict(raw)
    else:
        config_from_dict(raw)  # the schema alone lets it through: its owner's check


# One row per section, through the CLI: `flowmatch train CONFIG key=bad --dry-run` exits 2 with one
# line naming the key, and nothing is started (the run directory is never made).
CLI_BAD = [
    (["devise=cpu"], "devise: unknown key"),
    (["device=gpu"], "device: must be auto, cpu or cuda"),
    (["seed=abc"], "seed: expected an integer"),
    (["data.kind=nope"], "data.kind: unknown value 'nope'"),
    (["data.nn=3"], "data.nn: unknown key for kind 'toy2d'"),
    (["data.n=many"], "data.n: expected an integer"),
    (["model.hiden=3"], "model.hiden: unknown key for arch 'mlp'"),
    (["model.depth=0"], "model.depth: must be >= 1"),
    (["path.scheduler=cosinus"], "path.scheduler: unknown value 'cosinus'"),
    (["path.sigma_min=1.5"], "path.sigma_min: must be in [0, 1)"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["train.betas=[0.9]"], "train.betas: expected 2 values"),
    (["train.time_sampler.name=beta"], "train.time_sampler.name: unknown value 'beta'"),
    (["train.time_sampler.shift=0"], "train.time_sampler.shift: must be > 0"),
    (["train.time_sampler.name=logit_normal", "train.time_sampler.std=-1"], "train.time_sampler.std: must be > 0"),
    (["train.coupling.name=hungarian"], "train.coupling.name: unknown value 'hungarian'"),
    (["train.coupling.name=sinkhorn", "train.coupling.reg=0"], "train.coupling.reg: must be > 0"),
    (["train.coupling.name=sinkhorn", "train.coupling.iters=0"], "train.coupling.iters: must be >= 1"),
    (["train.coupling.name=exact", "train.coupling.reg=0.1"], "train.coupling.reg: unknown key for name 'exact'"),
    (["sample.method=rk45"], "sample.method: unknown solver 'rk45'"),
    (["sample.steps=0"], "sample.steps: must be >= 1"),
    (["sample.diffusion=loud"], "sample.diffusion: unknown diffusion 'loud'"),
    (["sample.n=0"], "sample.n: must be >= 1"),
]


@pytest.mark.parametrize("overrides, text", CLI_BAD, ids=[o[0].split("=")[0] for o, _ in CLI_BAD])
def test_cli_bad_value_exits_2_with_one_line_naming_the_key(overrides, text, capsys, tmp_path):
    assert main(["train", TOY, *overrides, f"out_dir={tmp_path / 'r'}", "--dry-run"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: {text}"), err
    assert len(err.splitlines()) == 1 and captured.out == ""
    assert not (tmp_path / "r").exists()


def test_cli_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", TOY, "train.coupling.name=sinkhorn", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["coupling"] == {"name": "sinkhorn", "reg": 0.05, "iters": 100, "tol": 1e-3}
    assert printed == config_to_dict(load_experiment(TOY, ["train.coupling.name=sinkhorn"]))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_run_dir_default():
    assert Config(name="abc").run_dir == Path("runs/abc")


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"; in a registry's arguments too.
    assert config_from_dict(yaml.safe_load("train: {lr: 1e-4}")).train.lr == 1e-4
    cfg = experiment_from_dict(yaml.safe_load("path: {scheduler: linear, sigma_min: 1e-4}"))
    assert cfg.path.params["sigma_min"] == 1e-4
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        config_from_dict({"train": {"lr": "1e-4x"}})


# ----------------------------------------------------------------------------------------------
# Reliability: an empty file and non-finite numbers are refused, naming the file or the key
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    empty = tmp_path / "exp.yaml"
    empty.write_text(text)
    with pytest.raises(ConfigError, match=r"config file '.*exp\.yaml' is empty") as e:
        load_config(empty, ["train.steps=5"])
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="is empty"):
        load_experiment(empty)


def test_no_file_or_an_explicit_empty_mapping_still_means_the_defaults(tmp_path):
    assert load_config(None) == Config()
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(tmp_path / "defaults.yaml") == Config()


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=.NaN", "train.lr"),
    ("train.grad_clip=-.inf", "train.grad_clip"),
    ("train.betas=[0.9, .nan]", "train.betas[1]"),
    ("sample.atol=inf", "sample.atol"),
    ("train.time_sampler.shift=inf", "train.time_sampler.shift"),
])
def test_non_finite_floats_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key}: must be a finite number, got ")
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("overrides, key", [
    (["train.coupling.name=sinkhorn", "train.coupling.reg=inf"], "train.coupling.reg"),
    (["train.time_sampler.name=logit_normal", "train.time_sampler.std=nan"], "train.time_sampler.std"),
    (["path.scheduler=vp", "path.beta_max=inf"], "path.beta_max"),
    (["model.arch=dit", "model.mlp_ratio=-inf"], "model.mlp_ratio"),
])
def test_non_finite_registry_arguments_are_refused_naming_the_key(overrides, key):
    config_from_dict(apply_overrides({}, overrides))  # raw extras: the registry's to check
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got "):
        load_experiment(None, overrides)


def test_a_float_or_none_keeps_none_and_refuses_nan():
    from flowmatch.config import check_value

    assert check_value("k", None, float | None) is None
    assert check_value("k", 2, float | None) == 2.0
    with pytest.raises(ConfigError, match="^k: must be a finite number, got nan$"):
        check_value("k", float("nan"), float | None)
    with pytest.raises(ConfigError, match=r"^k: expected float \| None, got 'x'$"):
        check_value("k", "x", float | None)


def test_meanflow_jumps_on_a_one_time_model_are_refused_at_config_time():
    from flowmatch.components import load_experiment

    with pytest.raises(ConfigError, match="^sample.method: meanflow jumps need a model of two times"):
        load_experiment(TOY, ["sample.method=meanflow"])
    cfg = load_experiment(str(ROOT / "configs" / "toy2d_meanflow.yaml"))  # the shipped recipe
    assert cfg.sample.method == "meanflow" and cfg.model.params["two_time"]
