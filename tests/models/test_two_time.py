"""Two-time conditioning (MeanFlow's average velocity ``u(x, t, r)``) of the MLP, U-Net and DiT.

A model built with its config's ``two_time: true`` embeds the interval ``h = r - t`` with a second
time embedder of the same kind as ``t``'s and reads ``r=None`` as ``r = t``; a model built without it
is the model of before (same state dict, same parameters, same outputs) and rejects an ``r``. The
objective differentiates a two-time model with ``torch.func.jvp`` w.r.t. ``(x, t, r)``, so that must
work for every architecture, in train mode (dropout) too, and agree with finite differences. The models
always attend through SDPA; forward-mode derivatives need its math backend, which the objective's
target (``mean_velocity_target``) selects for its JVP alone, so the JVPs here run under that context.
"""

import hashlib

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmatch.models import (
    DIT_PRESETS,
    MLP,
    MODEL_REGISTRY,
    DiT,
    DiTConfig,
    MLPConfig,
    UNet,
    UNetConfig,
    count_parameters,
)
from flowmatch.models.layers import (
    Attention,
    RotaryEmbedding2D,
    TimestepEmbedder,
    embed_times,
    interval_embedder,
)
from flowmatch.training.objectives import mean_velocity_target

NUM_CLASSES = 3

# Tiny versions of each architecture (milliseconds per forward on a CPU). The U-Net has dropout, so
# the train-mode checks see a random op inside the JVP; the second DiT has every attention option.
ARCHS = {
    "mlp": (MLP, MLPConfig, dict(hidden=32, depth=2, time_embed_dim=16), (3,)),
    "unet": (UNet, UNetConfig, dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                    attn_levels=(1,), num_heads=2, groups=4, dropout=0.1), (2, 8, 8)),
    "dit": (DiT, DiTConfig, dict(hidden_size=32, depth=2, num_heads=2, patch_size=2), (2, 8, 8)),
    "dit_rope": (DiT, DiTConfig, dict(hidden_size=32, depth=2, num_heads=2, patch_size=2, pos_embed="rope",
                                      qk_norm=True, norm="rmsnorm", mlp="swiglu"), (2, 8, 8)),
}


def _build(arch: str, two_time: bool = True, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    model_cls, config_cls, kwargs, data_shape = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs, two_time=two_time), data_shape, num_classes=num_classes)


def _perturb(model: nn.Module, std: float = 0.1, seed: int = 1, skip: str | None = None) -> nn.Module:
    """Add noise to every parameter (but those whose name starts with ``skip``), so the zero-initialised
    layers (output layers, adaLN, the interval embedder's output) no longer hide anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip is None or not name.startswith(skip):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def _inputs(model: nn.Module, batch: int = 3, seed: int = 2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.data_shape), generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.5
    r = t + torch.rand(batch, generator=gen, dtype=dtype) * 0.5  # r >= t
    y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=gen)  # the null class included
    return x, t, r, y


#################################################################################
#                     Config, attributes, the one-time model                    #
#################################################################################


def test_two_time_is_off_by_default_and_an_attribute():
    for model_cls, config_cls, kwargs, data_shape in ARCHS.values():
        assert config_cls().two_time is False
        one = model_cls(config_cls(**kwargs), data_shape)
        assert one.two_time is False and one.h_embedder is None
        two = model_cls(config_cls(**kwargs, two_time=True), data_shape)
        assert two.two_time is True and isinstance(two.h_embedder, TimestepEmbedder)
        # The same embedding machinery as t's: same features, widths, period and scale.
        for name in ("frequency_dim", "max_period", "scale"):
            assert getattr(two.h_embedder, name) == getattr(two.t_embedder, name)
        assert [p.shape for p in two.h_embedder.parameters()] == [p.shape for p in two.t_embedder.parameters()]
    # A YAML model section takes the key like any other field.
    assert MODEL_REGISTRY.build("dit", {"two_time": True, "depth": 2}).two_time is True


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_time_model_rejects_r(arch):
    model = _perturb(_build(arch, two_time=False)).eval()
    x, t, r, y = _inputs(model)
    with pytest.raises(ValueError, match="this model was built without two_time"):
        model(x, t, y, r=r)
    with pytest.raises(ValueError, match="this model was built without two_time"):
        model(x, t, y, r=t)  # even r = t: the caller asked for something this model does not have
    torch.testing.assert_close(model(x, t, y, r=None), model(x, t, y), rtol=0, atol=0)


# sha256[:16] of "key:shape" lines of the state dict and its number of entries, recorded with the
# code before two-time conditioning existed: runs saved then load into models built now.
STATE_DICT_PINS = {
    "mlp": ((MLP, MLPConfig(), (2,), 3), ("05c81f78269de9b6", 35)),
    "unet": ((UNet, UNetConfig(), (3, 32, 32), 10), ("5f75e4a5a12cdb8e", 245)),
    "dit": ((DiT, DiTConfig(depth=2), (4, 32, 32), 10), ("36b411a938c29b4d", 31)),
    "dit_options": ((DiT, DiTConfig(depth=2, pos_embed="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu"),
                     (4, 32, 32), 0), ("fbf32d3708f4669c", 34)),
}


def _state_dict_fingerprint(state_dict: dict) -> tuple[str, int]:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16], len(state_dict)


@pytest.mark.parametrize("name", list(STATE_DICT_PINS))
def test_one_time_state_dicts_are_those_of_before(name):
    (model_cls, cfg, data_shape, num_classes), pin = STATE_DICT_PINS[name]
    with torch.device("meta"):
        model = model_cls(cfg, data_shape, num_classes=num_classes)
    assert _state_dict_fingerprint(model.state_dict()) == pin
    # A two-time model's state dict is the one-time one plus exactly the interval embedder's two Linears.
    with torch.device("meta"):
        two = model_cls(type(cfg)(**{**vars(cfg), "two_time": True}), data_shape, num_classes=num_classes)
    extra = set(two.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) <= set(two.state_dict())
    assert extra == {f"h_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_saved_one_time_state_dict_loads_strictly(tmp_path):
    for arch in ARCHS:
        saved = _perturb(_build(arch, two_time=False, seed=3))
        torch.save(saved.state_dict(), tmp_path / f"{arch}.pt")
        fresh = _build(arch, two_time=False, seed=4)
        fresh.load_state_dict(torch.load(tmp_path / f"{arch}.pt", weights_only=True), strict=True)
        x, t, _, y = _inputs(fresh)
        torch.testing.assert_close(fresh.eval()(x, t, y), saved.eval()(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_dit_preset_counts_one_time_unchanged_two_time_adds_one_embedder(name):
    with torch.device("meta"):
        one = DiT(DiTConfig.from_preset(name, learn_sigma=True), (4, 32, 32), num_classes=1000)
        two = DiT(DiTConfig.from_preset(name, learn_sigma=True, two_time=True), (4, 32, 32), num_classes=1000)
    D = one.cfg.hidden_size
    t_embedder = 256 * D + D + D * D + D  # Linear(256, D), Linear(D, D)
    assert count_parameters(one.t_embedder) == t_embedder
    assert count_parameters(two) == count_parameters(one) + t_embedder


#################################################################################
#                      r = None, r = t, r != t, initialisation                  #
#################################################################################


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_r_none_is_r_equals_t_exactly(arch):
    model = _perturb(_build(arch)).eval()
    x, t, _, y = _inputs(model)
    out = model(x, t, y)
    assert torch.equal(out, model(x, t, y, r=t))
    assert torch.equal(out, model(x, t, y, r=t.clone()))
    # A scalar t broadcasts, and so does r, in each of the forms t takes.
    scalar = model(x, 0.25, y)
    for r in (0.25, torch.tensor(0.25), torch.full((3,), 0.25)):
        assert torch.equal(scalar, model(x, 0.25, y, r=r))
        assert torch.equal(scalar, model(x, torch.tensor(0.25), y, r=r))


@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_r_changes_the_output_per_sample(arch):
    model = _perturb(_build(arch)).eval()
    x, t, r, y = _inputs(model)
    at_t, at_r = model(x, t, y), model(x, t, y, r=r)
    assert (at_r - at_t).flatten(1).abs().amax(1).min() > 1e-4  # every sample moved
    # Moving sample 0's r alone changes sample 0 alone.
    r2 = r.clone()
    r2[0] = 1.0
    moved = model(x, t, y, r=r2)
    assert (moved[0] - at_r[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1:], at_r[1:])


def test_r_shape_is_checked():
    model = _build("mlp")
    x, t, _, _ = _inputs(model)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        model(x, t, r=torch.rand(4))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        model(x, t, r=torch.rand(3, 1))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_two_time_model_is_the_one_time_model(arch):
    one, two = _build(arch, two_time=False), _build(arch, two_time=True)
    # Same seed, same weights: the interval embedder is built from no random numbers, ...
    one_sd, two_sd = one.state_dict(), two.state_dict()
    assert all(torch.equal(one_sd[k], two_sd[k]) for k in one_sd)
    # ... its first layer starts as t's, its output layer at zero.
    assert torch.equal(two.h_embedder.mlp[0].weight, two.t_embedder.mlp[0].weight)
    assert not two.h_embedder.mlp[2].weight.any() and not two.h_embedder.mlp[2].bias.any()
    # So with the same (trained, here perturbed) one-time weights it computes the one-time model, any r.
    _perturb(one)
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert sorted(missing) == sorted(k for k in two_sd if k.startswith("h_embedder.")) and not unexpected
    x, t, r, y = _inputs(one)
    with torch.no_grad():
        want = one.eval()(x, t, y)
        got = two.eval()(x, t, y, r=r)
    assert torch.equal(got, want)  # the same kernels too (attention through SDPA in both)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_reach_the_interval_embedder(arch):
    # Trained weights everywhere but in the fresh interval embedder: its zeroed output layer gets a
    # gradient at once (learning r starts), its first layer once that output layer is non-zero.
    model = _perturb(_build(arch), skip="h_embedder.").train()
    x, t, r, y = _inputs(model)
    model(x, t, y, r=r).square().mean().backward()
    assert model.h_embedder.mlp[2].weight.grad.abs().sum() > 0
    assert model.h_embedder.mlp[2].bias.grad.abs().sum() > 0
    model.zero_grad()
    _perturb(model.h_embedder, seed=5)
    model(x, t, y, r=r).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("h_embedder."):
            assert p.grad.abs().sum() > 0, name


#################################################################################
#                 torch.func.jvp w.r.t. (x, t, r), as the objective uses it      #
#################################################################################


def _math_sdpa():
    """What the MeanFlow target runs its JVP under: SDPA's math backend, the one with forward-mode
    derivatives (the fused kernels have none as of torch 2.13)."""
    return sdpa_kernel(SDPBackend.MATH)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_jvp_runs_in_eval_and_train_mode(arch, train):
    model = _perturb(_build(arch)).train(train)
    x, t, r, y = _inputs(model)
    v = torch.randn_like(x)
    torch.manual_seed(7)  # the dropout masks of the JVP's forward
    with _math_sdpa():
        u, du_dt = torch.func.jvp(
            lambda x, t, r: model(x, t, y, r=r), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
        )
    assert u.shape == du_dt.shape == x.shape
    assert torch.isfinite(du_dt).all() and du_dt.abs().max() > 0
    torch.manual_seed(7)  # the same masks: the JVP's primal output is the model's (fused-kernel) output
    torch.testing.assert_close(u, model(x, t, y, r=r), rtol=1e-5, atol=1e-6)
    # And gradients flow through both outputs (the objective back-propagates through u).
    (u.square().mean() + du_dt.detach().mul(u).mean()).backward()
    assert model.h_embedder.mlp[0].weight.grad.abs().sum() > 0


def _fourth_order_difference(f, primals, tangents, eps):
    """``d/ds f(primals + s tangents)`` at ``s = 0`` by a central difference with Richardson
    extrapolation: ``(8 (f(e) - f(-e)) - (f(2e) - f(-2e))) / (12 e)``, error ``O(e^4)``."""

    def g(s):
        return f(*[p + s * d for p, d in zip(primals, tangents)])

    return (8 * (g(eps) - g(-eps)) - (g(2 * eps) - g(-2 * eps))) / (12 * eps)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_jvp_matches_finite_differences_in_float64(arch, train):
    model = _perturb(_build(arch)).double().train(train)
    # The sinusoidal time features are computed in float32 even in a float64 model (as DiT's
    # reference does); with scale 1 instead of 1000 the curvature of the fastest frequency is
    # small enough for a step that keeps their float32 rounding (~1e-7) out of the way.
    model.t_embedder.scale = model.h_embedder.scale = 1.0
    x, _, _, y = _inputs(model, dtype=torch.float64)
    t = torch.tensor([0.125, 0.25, 0.5], dtype=torch.float64)  # t +- k eps exact in float32
    r = torch.tensor([0.5, 0.625, 0.75], dtype=torch.float64)
    v, zero_x, zero_t, one_t = torch.randn_like(x), torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(t)

    def f(x, t, r):
        torch.manual_seed(11)  # in train mode: one dropout mask for every evaluation
        return model(x, t, y, r=r)

    def check(tangents, eps, rtol):
        with _math_sdpa():
            _, jvp = torch.func.jvp(f, (x, t, r), tangents)
        fd = _fourth_order_difference(f, (x, t, r), tangents, eps)
        scale = jvp.abs().max().item()
        assert scale > 1e-3  # the direction matters, so a wrong or missing term would show
        torch.testing.assert_close(jvp, fd, rtol=0, atol=rtol * scale)
        return jvp

    d_x = check((v, zero_t, zero_t), 2.0**-10, 1e-8)  # all float64
    d_t = check((zero_x, one_t, zero_t), 2.0**-5, 1e-4)  # through the float32 time features
    d_r = check((zero_x, zero_t, one_t), 2.0**-5, 1e-4)
    # The objective's tangent (v, 1, 0) is the sum of its parts, so it is checked too.
    with _math_sdpa():
        _, d_objective = torch.func.jvp(f, (x, t, r), (v, one_t, zero_t))
    torch.testing.assert_close(d_objective, d_x + d_t)
    assert d_t.abs().max() > 1e-2 * d_x.abs().max() and d_r.abs().max() > 1e-2 * d_x.abs().max()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mlp"])
def test_mean_velocity_target_of_attention_models_matches_finite_differences(arch):
    # The objective's own context, end to end, on the networks with attention: the target
    # u_tgt = v + (r - t) d/ds u(x + s v, t + s, r) at s = 0, in eval mode (as the target is taken).
    model = _perturb(_build(arch)).double()
    model.t_embedder.scale = model.h_embedder.scale = 1.0  # as above: a step clear of float32 rounding
    x, _, _, y = _inputs(model, dtype=torch.float64)
    t = torch.tensor([0.125, 0.25, 0.5], dtype=torch.float64)
    r = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)  # row 1: r = t, the target is v itself
    v = torch.randn_like(x)
    target = mean_velocity_target(model, x, t, r, v, y)
    assert model.training  # put back after the eval-mode JVP
    model.eval()
    with torch.no_grad():  # evaluated with the fused kernels, outside the objective's context
        def u(x, t):
            return model(x, t, y, r=r)

        # d/ds u = v . d_x u + d_t u, each part with the step of the test above (float32 time features)
        du_dt = (_fourth_order_difference(u, (x, t), (v, torch.zeros_like(t)), 2.0**-10)
                 + _fourth_order_difference(u, (x, t), (torch.zeros_like(x), torch.ones_like(t)), 2.0**-5))
    want = v + (r - t).view(-1, 1, 1, 1) * du_dt
    assert torch.equal(target[1], v[1])
    assert (target - v).abs().max() > 1e-2  # the JVP term is there
    torch.testing.assert_close(target, want, rtol=0, atol=1e-4 * want.abs().max().item())


#################################################################################
#                    The attention that forward-mode AD goes through             #
#################################################################################


@pytest.mark.parametrize("qk_norm, rope", [(None, False), ("rmsnorm", True)])
def test_attention_jvp_under_the_math_backend_is_the_jacobian(qk_norm, rope):
    # Forward mode (under the objective's context) agrees with reverse mode through the default
    # fused kernel: the full Jacobian contracted with the tangent.
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qk_norm=qk_norm)
    x = torch.randn(2, 9, 16)
    cos_sin = RotaryEmbedding2D(8, 3, 3)() if rope else None
    d = torch.randn_like(x)
    with _math_sdpa():
        out, jvp = torch.func.jvp(lambda x: attn(x, cos_sin), (x,), (d,))
    torch.testing.assert_close(out, attn(x, cos_sin), rtol=1e-5, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda x: attn(x, cos_sin), x)  # (2, 9, 16, 2, 9, 16)
    torch.testing.assert_close(jvp, torch.einsum("abcdef,def->abc", jac, d), rtol=1e-4, atol=1e-5)


def test_attention_dropout_only_in_training_jvp_included():
    attn = Attention(8, num_heads=2, dropout=0.5)
    x, d = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    with _math_sdpa():
        assert torch.equal(torch.func.jvp(attn, (x,), (d,))[1], torch.func.jvp(attn, (x,), (d,))[1])
    attn.train()
    with _math_sdpa():
        torch.manual_seed(0)
        a, da = torch.func.jvp(attn, (x,), (d,))
        torch.manual_seed(1)
        b, db = torch.func.jvp(attn, (x,), (d,))
    assert not torch.allclose(a, b) and not torch.allclose(da, db)


def test_embed_times_directly():
    torch.manual_seed(0)
    t_embedder = TimestepEmbedder(8, frequency_dim=6)
    h_embedder = interval_embedder(t_embedder)
    _perturb(h_embedder)
    x, t, r = torch.zeros(4, 2), torch.rand(4), torch.rand(4)
    want = t_embedder(t) + h_embedder(r - t)
    torch.testing.assert_close(embed_times(x, t, r, t_embedder, h_embedder), want, rtol=0, atol=0)
    torch.testing.assert_close(embed_times(x, t, None, t_embedder, None), t_embedder(t), rtol=0, atol=0)
    # The embedding of h = 0 is what r = None adds.
    torch.testing.assert_close(
        embed_times(x, t, None, t_embedder, h_embedder), t_embedder(t) + h_embedder(torch.zeros(4))
    )
