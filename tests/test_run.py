"""The Run object: loaded once from a run directory, it samples with noise and labels per index."""

import pytest
import torch
from train_fixtures import digits_cfg, toy_cfg, weights

from flowmatch.checkpoint import CheckpointError
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.run import Guidance, Run, SampleJob, SolverChoice, model_from_checkpoint
from flowmatch.training import Trainer


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    Trainer(toy_cfg(tmp, steps=4, sample_every=0), progress=False).fit()
    return tmp / "run"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    Trainer(digits_cfg(tmp, steps=2), progress=False).fit()
    return tmp / "run"


def test_load_gives_the_ema_model_config_and_facts(toy_run):
    run = Run.load(toy_run)
    model, cfg, state = model_from_checkpoint(toy_run)
    assert torch.equal(weights(run.model), weights(model))
    assert run.config == cfg and run.state["step"] == state["step"] == run.step == 4
    assert run.data_shape == (2,) and run.num_classes == 0 and not run.is_latent
    assert not run.makes_images
    assert run.checkpoint == toy_run / "checkpoints" / "latest.pt"
    raw = Run.load(toy_run, use_ema=False)
    assert not torch.equal(weights(raw.model), weights(run.model))


def test_sample_is_the_seeded_solve_of_each_index_whatever_the_batch(toy_run):
    run = Run.load(toy_run)
    settings = run.settings(SolverChoice(method="heun", steps=3))
    assert (settings.method, settings.steps) == ("heun", 3)
    together = run.sample([5, 6, 7], settings, seed=11)
    alone = run.sample([6], settings, seed=11)
    assert torch.equal(together.x[1], alone.x[0])
    assert together.nfe == together.network_evals == 6
    # the same as solving from the documented noise by hand
    x0 = seeded_noise([5, 6, 7], (2,), seed=11)
    by_hand = generate(run.model, x0, method="heun", steps=3)
    assert torch.equal(by_hand.x, together.x)
    batched = torch.cat([s.x for _, s in run.sample_batches(range(5), settings, SampleJob(n=5, seed=11,
                                                                                      batch_size=2))])
    assert torch.equal(batched, run.sample(range(5), settings, seed=11).x)


def test_labels_cycle_or_are_fixed_and_unconditional_runs_refuse_them(toy_run, digits_run):
    run = Run.load(digits_run)
    assert run.num_classes == 10
    assert run.labels([3, 12, 20]).tolist() == [3, 2, 0]
    assert run.labels([3, 12], label=7).tolist() == [7, 7]
    with pytest.raises(ValueError, match="label"):
        run.labels([0], label=10)
    toy = Run.load(toy_run)
    assert toy.labels([1, 2]) is None
    with pytest.raises(ValueError, match="unconditional"):
        toy.labels([1], label=0)
    with pytest.raises(ValueError, match="unconditional"):
        toy.velocity_model(Guidance(scale=2.0))


def test_guidance_counts_both_passes(digits_run):
    run = Run.load(digits_run)
    settings = run.settings(SolverChoice(method="euler", steps=2))
    plain = run.sample([0, 1], settings, seed=0)
    guided = run.sample([0, 1], settings, seed=0, guidance=Guidance(scale=2.0))
    assert plain.network_evals == 2 and guided.network_evals == 4 and guided.nfe == 2
    assert not torch.equal(plain.x, guided.x)
    same = run.sample([0, 1], settings, seed=0, guidance=Guidance(scale=1.0))
    assert torch.equal(same.x, plain.x)


def test_pixel_runs_decode_to_themselves_and_bad_sources_are_clear(digits_run, tmp_path):
    run = Run.load(digits_run)
    x = torch.randn(2, 1, 8, 8)
    assert run.decode(x) is x and run.makes_images
    with pytest.raises(ValueError, match="not a latent"):
        run.autoencoder()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Run.load(bad)


def test_sample_job_from_flat_options():
    job = SampleJob.from_options(n=4, method="rk4", steps=2, cfg_scale=3.0, seed=2, label=1)
    assert job.solver == SolverChoice(method="rk4", steps=2)
    assert job.guidance == Guidance(3.0, (0.0, 1.0)) and job.seed == 2 and job.label == 1
    with pytest.raises(TypeError, match="stepz"):
        SampleJob.from_options(n=4, stepz=3)
    with pytest.raises(ValueError, match="n: must be >= 1"):
        SampleJob(n=0).check()


def test_a_job_can_switch_compilation_on_and_folders_keep_one_kind(toy_run, tmp_path):
    from flowmatch.evaluation import sample_to_folder

    run = Run.for_job(toy_run, SampleJob(n=2, compile=True))
    assert run.config.sample.compile and run.network is not run.model
    assert not Run.for_job(toy_run, SampleJob(n=2)).config.sample.compile  # None: the run's own
    with pytest.raises(ValueError, match="unconditional"):
        Run.for_job(toy_run, SampleJob(n=2, guidance=Guidance(scale=2.0)))
    Trainer(digits_cfg(tmp_path, steps=1), progress=False).fit()
    digits = tmp_path / "run"
    out = tmp_path / "pngs"
    sample_to_folder(digits, out, n=2, method="euler", steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="compile"):
        sample_to_folder(digits, out, n=4, method="euler", steps=1, device="cpu", progress=False,
                         compile=True)
