"""flowmatch.registry: a name -> implementation table that checks the arguments a config gives."""

from dataclasses import dataclass, field

import pytest

from flowmatch.config import ConfigError
from flowmatch.registry import REQUIRED, Registry, config_errors, params_schema


class Widget:
    def __init__(self, size: int, ratio: float = 0.5, tags: tuple[int, ...] = (), name: str | None = None,
                 secret: bool = False, **ignored):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if ratio > size:
            raise ValueError(f"need ratio <= size, got {ratio} > {size}")
        self.size, self.ratio, self.tags, self.name = size, ratio, tags, name


@dataclass
class GadgetConfig:
    width: int = 4
    mults: tuple[int, ...] = (1, 2)
    extra: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"GadgetConfig.width must be >= 1, got {self.width}")


def widgets() -> Registry:
    return Registry("train.widget", "name", {"widget": Widget, "plain": dict}, hidden={"secret"})


def test_schema_of_a_callable_and_of_a_dataclass():
    s = params_schema(Widget, hidden={"secret"})
    assert list(s) == ["size", "ratio", "tags", "name"]  # no hidden, no **kwargs
    assert s["size"][1] is REQUIRED and s["ratio"] == (float, 0.5)
    d = params_schema(GadgetConfig)
    assert d["mults"][1] == (1, 2) and d["extra"][1] == []
    assert d["extra"][1] is not params_schema(GadgetConfig)["extra"][1]  # a fresh default each time


def test_resolve_fills_defaults_and_coerces():
    r = widgets()
    out = r.resolve("widget", {"size": 3, "tags": [1, 2], "ratio": 1})
    assert out == {"size": 3, "tags": (1, 2), "ratio": 1.0, "name": None}
    assert isinstance(out["ratio"], float)
    assert r.resolve("widget", out) == out  # idempotent


@pytest.mark.parametrize("params, message", [
    ({"size": 2, "sise": 3}, r"^train\.widget\.sise: unknown key for name 'widget' \(valid: name, ratio, size, tags\)$"),
    ({"size": 2, "secret": True}, r"^train\.widget\.secret: unknown key"),  # hidden: the caller's
    ({"size": "big"}, r"^train\.widget\.size: expected an integer, got 'big'$"),
    ({"size": 2, "tags": [1, "a"]}, r"^train\.widget\.tags\[1\]: expected an integer"),
    ({"size": 2, "name": 5}, r"^train\.widget\.name: expected str \| None, got 5$"),
    ({}, r"^train\.widget\.size: required for name 'widget'$"),
])
def test_resolve_errors_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        widgets().resolve("widget", params)


def test_unknown_choice_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"^train\.widget\.name: unknown value 'gizmo' \(valid: plain, widget\)$"):
        widgets().resolve("gizmo", {})


def test_build_names_the_key_a_constructor_complains_about():
    r = widgets()
    assert r.build("widget", {"size": 2}).ratio == 0.5
    with pytest.raises(ConfigError, match=r"^train\.widget\.size: must be >= 1, got 0$"):
        r.build("widget", {"size": 0})
    # a message that does not start with an argument's name names the section
    with pytest.raises(ConfigError, match=r"^train\.widget: need ratio <= size, got 3.0 > 2$"):
        r.build("widget", {"size": 2, "ratio": 3})


def test_build_through_a_constructor_of_the_entry():
    r = Registry("model", "arch", {"gadget": (GadgetConfig, object)}, constructor=lambda e: e[0])
    assert r["gadget"] == (GadgetConfig, object)  # the mapping gives the entries unchanged
    cfg = r.build("gadget", {"mults": [1, 4]})
    assert cfg == GadgetConfig(width=4, mults=(1, 4))
    with pytest.raises(ConfigError, match=r"^model\.width: must be >= 1, got 0$"):
        r.build("gadget", {"width": 0})


def test_config_errors_keep_config_errors_and_one_line():
    with pytest.raises(ConfigError, match=r"^already: named$"), config_errors("sec", ["already"]):
        raise ConfigError("already: named")
    with pytest.raises(ConfigError) as e, config_errors("sec"):
        raise TypeError("line one\n  line two")
    assert str(e.value) == "sec: line one line two"
    with pytest.raises(KeyError), config_errors("sec"):  # not a value mistake: not translated
        raise KeyError("x")


def test_a_registry_is_a_mutable_mapping():
    r = widgets()
    assert sorted(r) == ["plain", "widget"] and len(r) == 2 and "widget" in r and r["widget"] is Widget
    r["other"] = Widget
    assert r.resolve("other", {"size": 1})["size"] == 1
    del r["other"]
    with pytest.raises(ConfigError, match="unknown value 'other'"):
        r.resolve("other", {})
    assert dict(r) == {"widget": Widget, "plain": dict}


def test_the_package_registries_keep_their_old_shape():
    from flowmatch.data import DATASET_KINDS, LatentStore, Toy2D
    from flowmatch.flow.coupling import COUPLINGS, SinkhornCoupling
    from flowmatch.flow.paths import SCHEDULERS, LinearScheduler
    from flowmatch.flow.time_samplers import TIME_SAMPLERS, UniformTime
    from flowmatch.models import MODEL_REGISTRY, UNet, UNetConfig

    assert MODEL_REGISTRY["unet"] == (UNetConfig, UNet)
    assert DATASET_KINDS["latents"] is LatentStore and DATASET_KINDS["toy2d"] is Toy2D
    assert SCHEDULERS["linear"] is LinearScheduler and TIME_SAMPLERS["uniform"] is UniformTime
    assert COUPLINGS["sinkhorn"] is SinkhornCoupling
    sections = {r.section: r.tag for r in (MODEL_REGISTRY, DATASET_KINDS, SCHEDULERS, TIME_SAMPLERS, COUPLINGS)}
    assert sections == {"model": "arch", "data": "kind", "path": "scheduler",
                        "train.time_sampler": "name", "train.coupling": "name"}
    assert isinstance(MODEL_REGISTRY.build("unet", {}), UNetConfig)
    # the one owner of Sinkhorn's checks is its constructor
    with pytest.raises(ConfigError, match=r"^train\.coupling\.tol: must be > 0, got 0.0$"):
        COUPLINGS.build("sinkhorn", {"tol": 0})
