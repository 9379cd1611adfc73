"""flowmatch.components: resolving a config through the registries, and building its network."""

import pytest
import torch
import yaml

from flowmatch.checkpoint import load_checkpoint
from flowmatch.components import (
    REGISTRIES,
    build_model_from_config,
    experiment_from_dict,
    load_experiment,
    resolve_config,
)
from flowmatch.config import ConfigError, config_from_dict, config_to_dict, dump_config


def test_every_tagged_section_has_a_registry():
    cfg = config_from_dict({})
    for registry in REGISTRIES:
        node = cfg
        for part in registry.section.split("."):
            node = getattr(node, part)
        assert getattr(node, registry.tag) in registry and isinstance(node.params, dict)


def test_resolving_opens_no_data():
    # a folder that does not exist: the data set is only built by the trainer, not by resolving
    cfg = experiment_from_dict({"data": {"kind": "folder", "root": "/no/such/folder", "image_size": 8}})
    assert cfg.data.params == {"root": "/no/such/folder", "image_size": 8, "channels": 3,
                               "center_crop": True}


def test_load_experiment_is_load_config_then_resolve(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model: {arch: mlp, hidden: 8}\ndata: {kind: toy2d, name: moons}\n")
    cfg = load_experiment(path, ["model.depth=2", "train.coupling.name=sinkhorn"])
    assert cfg.model.params["hidden"] == 8 and cfg.model.params["depth"] == 2
    assert cfg.train.coupling.params == {"reg": 0.05, "iters": 100, "tol": 1e-3}
    with pytest.raises(ConfigError, match=r"^model\.hidden: must be >= 1, got 0$"):
        load_experiment(path, ["model.hidden=0"])


def test_the_model_of_a_strict_config_is_the_model_of_its_resolved_config():
    raw = {"model": {"arch": "unet", "base_channels": 8, "channel_mults": [1, 2], "attn_levels": [],
                     "num_res_blocks": 1}}
    strict = config_from_dict(raw)
    torch.manual_seed(0)
    a = build_model_from_config(strict, (1, 8, 8), 0)
    torch.manual_seed(0)
    b = build_model_from_config(resolve_config(strict), (1, 8, 8), 0)
    assert a.cfg == b.cfg
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match=r"^model\.base_chanels: unknown key"):
        build_model_from_config(config_from_dict({"model": {"arch": "unet", "base_chanels": 8}}), (1, 8, 8), 0)


def test_the_trainer_stores_the_resolved_config(tmp_path):
    from flowmatch.training import Trainer

    strict = config_from_dict({
        "name": "t", "out_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"kind": "toy2d", "name": "moons", "n": 64},
        "model": {"arch": "mlp", "hidden": 8, "depth": 1},
        "train": {"steps": 1, "batch_size": 8, "sample_every": 0, "log_every": 1},
        "sample": {"method": "euler", "steps": 1, "n": 4},
    })
    assert "time_embed_dim" not in strict.model.params
    trainer = Trainer(strict, progress=False)
    resolved = config_to_dict(resolve_config(strict))
    assert config_to_dict(trainer.cfg) == resolved
    trainer.fit()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == resolved
    stored = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["config"]
    assert stored == resolved and "time_embed_dim" in stored["model"]
    assert dump_config(experiment_from_dict(stored)) == dump_config(trainer.cfg)
