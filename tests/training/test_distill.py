"""Reflow and distillation: the teacher's pair store, the students' training, their few-step quality."""

import json

import numpy as np
import pytest
import torch

from flowmatch.cli import main
from flowmatch.config import config_from_dict
from flowmatch.data import PairStore, build_dataset
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.flow.solvers import solve_ode
from flowmatch.flow.time_samplers import time_grid
from flowmatch.training import Trainer, model_from_checkpoint
from flowmatch.training.distill import make_pairs, run_distill, run_reflow


def teacher_cfg(tmp_path, steps=400, class_cond=False, name="8gaussians"):
    return config_from_dict({
        "name": "teacher", "seed": 0, "out_dir": str(tmp_path / "teacher"), "device": "cpu",
        "data": {"kind": "toy2d", "name": name, "n": 4000},
        "model": {"arch": "mlp", "hidden": 64, "depth": 3, "class_cond": class_cond},
        "train": {"steps": steps, "batch_size": 256, "lr": 3e-3, "warmup_steps": 20, "log_every": 50,
                  "sample_every": 0, "save_every": 0, "ema_decay": 0.99},
        "sample": {"method": "rk4", "steps": 8, "n": 64},
    })


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    Trainer(teacher_cfg(tmp), progress=False).fit()
    return tmp / "teacher"


def test_make_pairs_records_the_teacher_trajectory(teacher, tmp_path):
    times = time_grid(2, dtype=torch.float64)
    meta = make_pairs(teacher, tmp_path / "pairs", n=40, times=times, method="rk4",
                      steps_per_segment=4, seed=5, batch_size=16, progress=False)
    assert meta["nfe_per_pair"] == 2 * 4 * 4 and meta["teacher_nfe_total"] == 40 * 32
    store = build_dataset("pairs", path=str(tmp_path / "pairs"))
    assert isinstance(store, PairStore) and len(store) == 40 and store.data_shape == (2,)
    x0, traj, y = store.batch([3, 0, 39])
    assert traj.shape == (3, 2, 2) and y.tolist() == [0, 0, 0]
    # noise from seeded_noise(i), states equal to the teacher's own rk4 solve through t = 1/2
    torch.testing.assert_close(x0, seeded_noise([3, 0, 39], (2,), seed=5))
    model, _, _ = model_from_checkpoint(teacher)
    with torch.no_grad():
        half = solve_ode(lambda x, t: model(x, t), x0, method="rk4",
                         grid=torch.linspace(0.0, 0.5, 5)).x
    full = generate(model, x0, method="rk4", steps=8).x
    torch.testing.assert_close(traj[:, 0], half, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj[:, 1], full, rtol=0, atol=1e-5)
    x1, label = store[39]
    torch.testing.assert_close(x1, traj[2, 1])
    assert label == 0
    # the same settings reuse the store; other settings rebuild it
    again = make_pairs(teacher, tmp_path / "pairs", n=40, times=times, method="rk4",
                       steps_per_segment=4, seed=5, batch_size=7, progress=False)
    assert again["seconds"] == meta["seconds"]
    other = make_pairs(teacher, tmp_path / "pairs", n=40, times=times, method="rk4",
                       steps_per_segment=4, seed=6, batch_size=16, progress=False)
    assert other["seed"] == 6


def test_pair_store_refuses_broken_folders(teacher, tmp_path):
    with pytest.raises(ValueError, match="not a pair store"):
        PairStore(tmp_path)
    make_pairs(teacher, tmp_path / "p", n=8, times=torch.tensor([0.0, 1.0]), steps_per_segment=2,
               progress=False)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    meta["n"] = 9
    (tmp_path / "p" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="truncated"):
        PairStore(tmp_path / "p")
    meta["complete"] = False
    (tmp_path / "p" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incomplete"):
        PairStore(tmp_path / "p")
    with pytest.raises(ValueError, match="times"):
        make_pairs(teacher, tmp_path / "q", n=4, times=torch.tensor([0.0, 0.5]), progress=False)


def _gap(model, x0, reference, steps):
    """RMS distance of the model's ``steps``-step Euler samples to the teacher's fine samples."""
    x = generate(model, x0, method="euler", steps=steps).x
    return (x - reference).pow(2).sum(1).mean().sqrt().item()


def test_distilled_one_step_student_beats_the_teachers_one_step(teacher, tmp_path):
    report = run_distill(teacher, tmp_path / "d1", nfe=1, n=2000, train_steps=300, method="rk4",
                         steps_per_segment=8, progress=False,
                         overrides=["train.lr=2e-3", "train.ema_decay=0.9"])
    assert report["teacher_nfe_per_pair"] == 32 and report["train_steps"] == 300
    assert json.loads((tmp_path / "d1" / "distill.json").read_text())["kind"] == "distill"
    student, cfg, _ = model_from_checkpoint(tmp_path / "d1")
    assert (cfg.sample.method, cfg.sample.steps, cfg.train.objective) == ("euler", 1, "segments")
    t_model, _, _ = model_from_checkpoint(teacher)
    x0 = seeded_noise(range(1000), (2,), seed=99)  # unseen noise
    reference = generate(t_model, x0, method="rk4", steps=16).x
    teacher_gap, student_gap = _gap(t_model, x0, reference, 1), _gap(student, x0, reference, 1)
    assert student_gap < 0.5 * teacher_gap, (student_gap, teacher_gap)


def test_reflow_straightens_the_flow(teacher, tmp_path):
    report = run_reflow(teacher, tmp_path / "r", n=2000, train_steps=300, method="rk4", steps=16,
                        progress=False, overrides=["train.lr=2e-3", "train.ema_decay=0.9"])
    assert report["kind"] == "reflow" and report["teacher_nfe_per_pair"] == 64
    student, cfg, _ = model_from_checkpoint(tmp_path / "r")
    assert cfg.train.objective == "flow" and cfg.data.kind == "pairs"
    t_model, _, _ = model_from_checkpoint(teacher)
    x0 = seeded_noise(range(1000), (2,), seed=98)
    reference = generate(t_model, x0, method="rk4", steps=16).x
    # the reflowed flow maps noise to (nearly) the teacher's sample along a straighter path
    assert _gap(student, x0, reference, 2) < 0.7 * _gap(t_model, x0, reference, 2)


def test_student_starts_from_the_teacher(teacher, tmp_path):
    cfg_steps = ["train.steps=1"]
    run_distill(teacher, tmp_path / "s", nfe=2, n=64, train_steps=1, steps_per_segment=2,
                progress=False, overrides=cfg_steps + ["train.lr=1e-12"])
    student, _, state = model_from_checkpoint(tmp_path / "s", use_ema=False)
    t_model, _, _ = model_from_checkpoint(teacher)
    for a, b in zip(student.parameters(), t_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_class_conditional_pairs_cycle_labels_and_train(tmp_path):
    cfg = config_from_dict({
        "name": "dig", "seed": 1, "out_dir": str(tmp_path / "teacher"), "device": "cpu",
        "data": {"kind": "digits", "image_size": 8, "split": "train"},
        "model": {"arch": "unet", "class_cond": True, "base_channels": 8, "channel_mults": [1, 2],
                  "num_res_blocks": 1, "attn_levels": [], "num_heads": 2},
        "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "sample_every": 0, "save_every": 0,
                  "label_dropout": 0.3},
        "sample": {"method": "euler", "steps": 2, "n": 10},
    })
    Trainer(cfg, progress=False).fit()
    make_pairs(tmp_path / "teacher", tmp_path / "p", n=20, times=torch.tensor([0.0, 0.5, 1.0]),
               steps_per_segment=1, progress=False, cfg_scale=2.0)
    store = PairStore(tmp_path / "p")
    assert store.num_classes == 10 and store.data_shape == (1, 8, 8)
    _, traj, y = store.batch(list(range(20)))
    assert y.tolist() == [i % 10 for i in range(20)] and traj.shape == (20, 2, 1, 8, 8)
    assert store.meta["cfg_scale"] == 2.0
    # the guidance really acts: the same noise and labels without it give other trajectories
    make_pairs(tmp_path / "teacher", tmp_path / "p1", n=20, times=torch.tensor([0.0, 0.5, 1.0]),
               steps_per_segment=1, progress=False)
    x0_plain, traj_plain, _ = PairStore(tmp_path / "p1").batch(list(range(20)))
    x0_guided, _, _ = store.batch(list(range(20)))
    torch.testing.assert_close(x0_plain, x0_guided)
    assert (traj_plain - traj).abs().max() > 1e-3
    # and it is the documented guided flow, solved the same way
    from flowmatch.flow.guidance import ClassifierFreeGuidance

    guided = ClassifierFreeGuidance(model_from_checkpoint(tmp_path / "teacher")[0], 2.0)
    with torch.no_grad():
        want = solve_ode(lambda x, t: guided(x, t, y), x0_guided, method="rk4",
                         grid=torch.tensor([0.0, 0.5, 1.0]), return_trajectory=True).trajectory
    torch.testing.assert_close(traj, torch.stack(want[1:], dim=1), rtol=0, atol=1e-5)
    # a class-conditional student trains on them (labels, label dropout, segments)
    report = run_distill(tmp_path / "teacher", tmp_path / "s", nfe=2, n=20, train_steps=2,
                         steps_per_segment=1, progress=False, overrides=["train.batch_size=4"])
    assert report["train_status"] == "finished"


def test_cli_distill_and_reflow(teacher, tmp_path, capsys):
    rc = main(["distill", str(teacher), "--nfe", "2", "--pairs", "64", "--train-steps", "3",
               "--out", str(tmp_path / "cli_d"), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "cli_d" / "distill.json").read_text())
    assert report["student_sampler"] == {"method": "euler", "steps": 2, "grid": "uniform"}
    rc = main(["reflow", str(teacher), "train.batch_size=16", "--pairs", "32", "--train-steps", "2",
               "--teacher-method", "euler", "--teacher-steps", "4", "--out", str(tmp_path / "cli_r"),
               "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "cli_r" / "distill.json").read_text())["teacher_nfe_per_pair"] == 4
    assert main(["distill", str(teacher), "--nfe", "0", "--out", str(tmp_path / "bad")]) == 2
    assert main(["distill", str(teacher), "train.objectiv=flow", "--nfe", "2", "--pairs", "8",
                 "--out", str(tmp_path / "bad2")]) == 2
    assert np.isfinite(report["pair_seconds"])
