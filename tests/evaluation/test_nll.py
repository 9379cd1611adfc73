"""``eval nll``, the job: settings, the numbers on a tiny trained toy run (independent of the batch
size, the same through settings or keywords, nothing written), and the command line."""

import json
import math
from pathlib import Path

import pytest
import torch

from flowmatch.cli import main
from flowmatch.config import ConfigError
from flowmatch.evaluation.likelihood import LikelihoodSettings, default_method
from flowmatch.evaluation.nll import (
    NLLSettings,
    dequantization_levels,
    evaluate_nll,
    job_likelihood_settings,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy2d.yaml")


def _train_toy(root, *extra):
    args = [TOY, f"out_dir={root}", "train.steps=4", "train.batch_size=32", "data.n=300",
            "model.hidden=16", "model.depth=1", "train.log_every=2", "train.sample_every=0",
            "train.save_every=4", "sample.steps=2", "sample.n=16", "device=cpu", *extra]
    assert main(["train", *args, "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return _train_toy(tmp_path_factory.mktemp("nll") / "run")


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def test_solver_defaults():
    assert job_likelihood_settings().method == default_method()
    assert job_likelihood_settings(steps=8) == LikelihoodSettings(method="rk4", steps=8)
    assert job_likelihood_settings(method="euler").steps == 32  # fixed-step without steps
    assert job_likelihood_settings(method="dopri5").steps is None
    assert NLLSettings().likelihood == job_likelihood_settings()


def test_flat_keywords_are_routed_and_checked():
    s = NLLSettings.from_options(n=64, seed=3, divergence="hutchinson", n_probes=4, steps=8,
                                 data_params={"split": "test"}, allow_approximate_prior=True)
    assert (s.n, s.seed, s.data_params) == (64, 3, {"split": "test"})
    assert s.likelihood == LikelihoodSettings(divergence="hutchinson", n_probes=4, method="rk4",
                                              steps=8, allow_approximate_prior=True)
    with pytest.raises(TypeError, match="probs"):
        NLLSettings.from_options(probs=4)
    # the library names its own arguments, not the command line's flags
    for kw, key in [({"n": 0}, "^n:"), ({"batch_size": 0}, "^batch_size:"),
                    ({"n_probes": 0}, "^n_probes:")]:
        with pytest.raises(ConfigError, match=key):
            NLLSettings.from_options(**kw)
    with pytest.raises(ValueError, match="dequantize mode"):
        NLLSettings(dequantize_mode="4bit")
    with pytest.raises(ValueError, match="divergence"):
        NLLSettings.from_options(divergence="trace")


# ----------------------------------------------------------------------------------------------
# The job on a trained run
# ----------------------------------------------------------------------------------------------


def _numbers(res):
    return {k: v for k, v in res.items() if k != "seconds"}


def test_settings_object_equals_keywords_and_nothing_is_written(toy_run):
    before = sorted(p.relative_to(toy_run) for p in toy_run.rglob("*"))
    kw = {"n": 24, "divergence": "hutchinson", "n_probes": 2, "method": "rk4", "steps": 3,
          "seed": 5}
    by_keywords = evaluate_nll(toy_run, **kw)
    by_settings = evaluate_nll(toy_run, NLLSettings.from_options(**kw))
    assert _numbers(by_keywords) == _numbers(by_settings)
    assert sorted(p.relative_to(toy_run) for p in toy_run.rglob("*")) == before
    assert by_keywords["checkpoint"].endswith("latest.pt") and by_keywords["step"] == 4
    with pytest.raises(TypeError, match="not both"):
        evaluate_nll(toy_run, NLLSettings(), n=3)


def test_numbers_do_not_depend_on_the_batch_size(toy_run):
    # Probes are drawn per item from (seed, i): batches of 7 and one batch of 30 score alike.
    kw = {"n": 30, "divergence": "hutchinson", "method": "rk4", "steps": 3, "seed": 2}
    small = evaluate_nll(toy_run, batch_size=7, **kw)
    whole = evaluate_nll(toy_run, batch_size=30, **kw)
    assert small["nll_nats"] == pytest.approx(whole["nll_nats"], rel=1e-6, abs=1e-6)
    assert small["n"] == whole["n"] == 30 and small["nfe"] == whole["nfe"] == 12
    other_seed = evaluate_nll(toy_run, batch_size=30, **{**kw, "seed": 3})
    assert other_seed["nll_nats"] != whole["nll_nats"]


def test_ema_and_raw_weights_differ(toy_run):
    kw = {"n": 8, "method": "rk4", "steps": 2}
    ema, raw = evaluate_nll(toy_run, **kw), evaluate_nll(toy_run, use_ema=False, **kw)
    assert ema["ema"] and not raw["ema"] and ema["nll_nats"] != raw["nll_nats"]


# ----------------------------------------------------------------------------------------------
# The command line on a tiny trained toy run
# ----------------------------------------------------------------------------------------------


def test_cli_nll_end_to_end(toy_run, tmp_path, capsys):
    assert main(["eval", "nll", str(toy_run), "--n", "64", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == json.loads((toy_run / "nll.json").read_text())
    for key in ("nll_nats", "nll_nats_stderr", "bits_per_dim", "bits_per_dim_stderr"):
        assert math.isfinite(res[key]), key
    assert res["n"] == 64 and res["dim"] == 2 and res["divergence"] == "exact"
    assert res["method"] == "dopri5" and res["nfe"] > 0 and res["backward_passes"] == 2 * res["nfe"]
    assert res["dequantize"] == "none" and "vector data" in res["note"]
    assert res["bits_per_dim"] == pytest.approx(res["nll_nats"] / (2 * math.log(2)))
    # Hutchinson, fixed steps, another data draw, a checkpoint file, --out; agrees with exact to
    # within its noise (rk4 is accurate enough on this nearly untrained, smooth MLP).
    out = tmp_path / "h.json"
    assert main(["eval", "nll", str(toy_run / "checkpoints" / "latest.pt"), "--n", "64",
                 "--divergence", "hutchinson", "--probes", "4", "--probe", "gaussian",
                 "--method", "rk4", "--steps", "8", "--data", "seed=1", "--out", str(out),
                 "--batch-size", "32", "--device", "cpu"]) == 0
    h = json.loads(out.read_text())
    assert h["divergence"] == "hutchinson" and h["nfe"] == 32 and h["backward_passes"] == 128
    assert h["data"]["seed"] == 1 and h["steps"] == 8 and h["probes"] == 4
    assert abs(h["nll_nats"] - res["nll_nats"]) < 0.5  # same distribution, other points


def test_cli_nll_bad_input_exits_2(toy_run, tmp_path, capsys):
    run = str(toy_run)
    assert main(["eval", "nll", run, "--n", "4", "--divergence", "trace", "--device", "cpu"]) == 2
    assert "divergence" in capsys.readouterr().err
    assert main(["eval", "nll", run, "--n", "4", "--split", "test", "--device", "cpu"]) == 2
    assert "split" in capsys.readouterr().err
    assert main(["eval", "nll", run, "--n", "4", "--dequantize", "8bit", "--device", "cpu"]) == 2
    assert "not quantised" in capsys.readouterr().err
    vp_run = _train_toy(tmp_path / "vp", "path.scheduler=vp")
    assert main(["eval", "nll", str(vp_run), "--n", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "t=0" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "nll", str(vp_run), "--n", "4", "--method", "rk4", "--steps", "4",
                 "--allow-approximate-prior", "--device", "cpu"]) == 0
    assert "approximate" in json.loads((vp_run / "nll.json").read_text())["prior"]


def test_auto_dequantization_follows_the_data(tmp_path):
    from PIL import Image

    from flowmatch.data import ImageFolder

    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = torch.randint(0, 256, (6, 6, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    folder = ImageFolder(tmp_path, image_size=4)  # resized by Pillow: still 8-bit values
    x = torch.stack([folder[i][0] for i in range(2)])
    assert dequantization_levels(folder, x, "auto")[0] == 256
    assert dequantization_levels(folder, x, "none")[0] is None

    class Resized:  # like the digits: image data whose values are not on the 8-bit grid
        kind = "image"

    levels, note = dequantization_levels(Resized(), torch.tensor([[0.1234, -1.0]]), "auto")
    assert levels is None and "not comparable" in note
