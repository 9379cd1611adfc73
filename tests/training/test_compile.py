"""torch.compile as config switches (train.compile, sample.compile) and the CUDA-only fast paths.

The compiled tests run Inductor on the CPU (it generates C++ and builds it with the system compiler):
one tiny class-conditional DiT with 2-D RoPE, shared by every test so the compiled graphs are built
once and found in Inductor's cache afterwards. They are skipped, with the reason, only where
torch.compile cannot run at all (no Dynamo support for this Python, no C++ compiler).
"""

import pytest
import torch
from train_fixtures import digits_cfg, weights

import flowmatch.training.trainer as trainer_module
from flowmatch.components import build_model_from_config
from flowmatch.config import config_from_dict
from flowmatch.models import DiT, DiTConfig
from flowmatch.run import Run
from flowmatch.training import Trainer, load_checkpoint
from flowmatch.training.trainer import fast_paths

# One architecture and batch size throughout: the eval-mode graph of the forward test is the one
# the sampling test builds, so Inductor compiles it once.
TINY_DIT = {"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 2, "pos_embed": "rope"}
BATCH = 4


@pytest.fixture(scope="module")
def compile_works():
    """Skip (with torch's error) where torch.compile cannot run on this platform."""
    try:
        out = torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as error:  # no Dynamo for this Python, no C++ compiler, ...
        pytest.skip(f"torch.compile is unavailable here: {type(error).__name__}: {error}")
    assert torch.equal(out, torch.full((2,), 2.0))


def _dit_cfg(tmp_path, name: str, compile: bool):
    return config_from_dict({
        "name": name, "seed": 1, "out_dir": str(tmp_path / name), "device": "cpu",
        "data": {"kind": "digits", "image_size": 8, "split": "train"},
        "model": {"arch": "dit", "class_cond": True, **TINY_DIT},
        "train": {"steps": 3, "batch_size": 8, "lr": 2e-3, "log_every": 1, "sample_every": 0,
                  "save_every": 0, "label_dropout": 0.25, "compile": compile},
        "sample": {"method": "euler", "steps": 2, "n": BATCH, "compile": compile},
    })


@pytest.mark.slow
def test_compiled_dit_forward_matches_eager(compile_works):
    torch.manual_seed(0)
    model = DiT(DiTConfig(**TINY_DIT), (1, 8, 8), num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():  # random weights everywhere (the zero-init layers hide bugs)
            p.normal_(0.0, 0.2)
    # fullgraph: the whole forward, RoPE included, is one graph (no eager fall-back around it)
    compiled = torch.compile(model, fullgraph=True)
    x, t, y = torch.randn(BATCH, 1, 8, 8), torch.rand(BATCH), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        eager = model(x, t, y)
        scale = float(eager.abs().max())
        # float32 rounding of fused kernels, relative to the output's scale
        torch.testing.assert_close(compiled(x, t, y), eager, rtol=1e-4, atol=1e-5 * scale)
    assert scale > 0.1


@pytest.mark.slow
def test_train_and_sample_compile_match_eager_with_plain_checkpoints(tmp_path, compile_works):
    eager = Trainer(_dit_cfg(tmp_path, "eager", compile=False), progress=False)
    compiled = Trainer(_dit_cfg(tmp_path, "compiled", compile=True), progress=False)
    assert compiled.ddp_model is not compiled.model  # the training forward is the compiled one
    assert isinstance(compiled.ddp_model, torch._dynamo.eval_frame.OptimizedModule)
    assert eager.ddp_model is eager.model
    initial = weights(compiled.model).clone()
    assert torch.equal(initial, weights(eager.model))  # the same seeded start
    assert eager.fit().status == compiled.fit().status == "finished"

    # a few optimizer steps agree to float rounding (Inductor fuses, eager does not: not bit-equal)
    torch.testing.assert_close(weights(compiled.model), weights(eager.model), rtol=1e-4, atol=1e-5)
    assert (weights(compiled.model) - initial).abs().max() > 1e-3  # and training moved them
    torch.testing.assert_close(weights(compiled.ema.model), weights(eager.ema.model), rtol=1e-4, atol=1e-5)

    # checkpoints keep plain keys: they load into a plain model, and Run.load reads them
    state = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "latest.pt")
    for part in ("model", "ema"):
        assert not any("_orig_mod" in key for key in state[part])
        assert set(state[part]) == set(eager.model.state_dict())
    loaded = Run.load(tmp_path / "compiled")

    # sample.compile: the run's network is compiled, over the live EMA weights; same samples
    run = compiled.run
    assert isinstance(run.network, torch._dynamo.eval_frame.OptimizedModule)
    assert run.network is run.network and run.model is compiled.ema.model  # built once; plain model
    assert eager.run.network is eager.run.model
    settings = run.settings()
    got = run.sample(range(BATCH), settings, seed=0).x
    want = loaded.sample(range(BATCH), settings, seed=0).x  # sample.compile is in its config too
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager.run.sample(range(BATCH), settings, seed=0).x,
                               rtol=1e-3, atol=1e-4)


#################################################################################
#                        CUDA-only fast paths, off on CPU                       #
#################################################################################


def test_fast_paths_selection():
    assert fast_paths(torch.device("cpu")) == {"adamw": {"foreach": True}, "tf32": False,
                                               "channels_last": False}
    # a device object needs no GPU: the selection is testable anywhere
    assert fast_paths(torch.device("cuda", 1)) == {"adamw": {"fused": True}, "tf32": True,
                                                   "channels_last": True}
    assert fast_paths("cuda")["adamw"] == {"fused": True}


def test_cpu_training_set_up_is_unchanged(tmp_path):
    precision = torch.get_float32_matmul_precision()
    trainer = Trainer(digits_cfg(tmp_path), progress=False)  # a U-Net
    defaults = trainer.optimizer.defaults
    assert defaults["foreach"] is True and not defaults["fused"]  # the CPU update of earlier versions
    assert torch.get_float32_matmul_precision() == precision  # no TF32 switch on CPU
    assert trainer.model.channels_last is False
    assert trainer.ddp_model is trainer.model  # train.compile is off by default
    assert trainer.run.network is trainer.run.model  # and so is sample.compile


def test_cuda_fast_paths_are_applied(tmp_path, monkeypatch):
    # What a CUDA run would get, on CPU: fused AdamW (CPU has a fused kernel too), the TF32 switch
    # (recorded, not set: it is process-wide), the U-Net in channels-last.
    monkeypatch.setattr(trainer_module, "fast_paths", lambda device: fast_paths(torch.device("cuda")))
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    trainer = Trainer(digits_cfg(tmp_path), progress=False)
    assert trainer.optimizer.defaults["fused"] is True and not trainer.optimizer.defaults["foreach"]
    assert calls == ["high"]
    model = trainer.model
    assert model.channels_last and model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.ema.model.channels_last  # the EMA copy samples in the same layout
    plain = build_model_from_config(trainer.cfg, trainer.data_shape, trainer.num_classes)
    assert set(model.state_dict()) == set(plain.state_dict())
    trainer.fit()  # trains and checkpoints as usual
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == trainer.cfg.train.steps
