"""Batch sources: the step's draws, process slices, the prefetch thread, CoupledBatches."""

import threading

import pytest
import torch
from train_fixtures import toy_cfg

from flowmatch.flow.coupling import ExactCoupling, pair_cost
from flowmatch.flow.time_samplers import UniformTime
from flowmatch.training import CoupledBatches, Trainer
from flowmatch.training.batches import (
    BatchStream,
    CoupledSource,
    MemoryRows,
    PlainBatches,
    Prefetch,
    StepDraws,
    StreamLoader,
    step_generator,
)


def _draws(G=8, **kw):
    return StepDraws(seed=5, global_batch=G, data_shape=(2,), time_sampler=UniformTime(), **kw)


def _is_permutation(perm, n):
    return sorted(perm.tolist()) == list(range(n))


def test_step_draws_are_the_step_generators_draws_in_order():
    x0, t, flip, drop, eps = _draws(label_dropout=0.25).draw(3)
    g = step_generator(5, 3)
    assert torch.equal(x0, torch.randn(8, 2, generator=g))
    assert torch.equal(t, torch.rand(8, generator=g))
    assert torch.equal(flip, torch.rand(8, generator=g) < 0.5)
    assert torch.equal(drop, torch.rand(8, generator=g) < 0.25)
    assert eps is None
    assert not torch.equal(x0, _draws().draw(4)[0])  # another step, other noise


def test_posterior_draw_and_flips_apply_to_the_data():
    draws = StepDraws(seed=1, global_batch=4, data_shape=(1, 2, 2), time_sampler=UniformTime(),
                      posterior=True, hflip=True)
    mean, std = torch.randn(4, 1, 2, 2), torch.rand(4, 1, 2, 2)
    x0, x1, t, drop = draws.pair(0, torch.cat([mean, std], dim=1), slice(None))
    _, _, flip, _, eps = draws.draw(0)
    z = mean + std * eps
    assert torch.allclose(x1, torch.where(flip.view(-1, 1, 1, 1), z.flip(-1), z))


def test_plain_batches_of_two_processes_are_the_slices_of_one():
    X, Y = torch.randn(50, 2), torch.arange(50)

    def source(rank, world):
        stream = BatchStream(50, 8, seed=2, rank=rank, world_size=world)
        return PlainBatches(MemoryRows(X, Y, stream.local_indices), _draws(), stream.rows)

    one, r0, r1 = source(0, 1), source(0, 2), source(1, 2)
    for k in (0, 7):
        whole, a, b = one(k), r0(k), r1(k)
        for name in ("x0", "x1", "t", "y", "drop"):
            assert torch.equal(torch.cat([getattr(a, name), getattr(b, name)]), getattr(whole, name))


def test_stream_loader_reads_in_step_order_only():
    X = torch.arange(20.0).view(10, 2)
    dataset = torch.utils.data.TensorDataset(X, torch.arange(10))
    stream = BatchStream(10, 4, seed=0)
    loader = StreamLoader(dataset, stream, start=3)
    x, y = loader(3)
    assert torch.equal(y, stream.local_indices(3)) and torch.equal(x, X[y])
    with pytest.raises(RuntimeError, match="micro-step 7"):
        loader(7)


def test_prefetch_gives_the_inline_results_and_runs_ahead_in_its_thread():
    calls = []

    def fn(k):
        calls.append((k, threading.current_thread().name))
        return k * k

    with Prefetch(fn, end=4, name="test-prefetch") as prefetch:
        assert [prefetch.get(k) for k in range(4)] == [0, 1, 4, 9]
        assert prefetch.get(2) == 4  # out of order: computed on request
    assert prefetch.pool is None
    assert all(name.startswith("test-prefetch") for _, name in calls)
    assert max(k for k, _ in calls) == 3  # nothing started at or past `end`
    with pytest.raises(RuntimeError, match="closed"):
        prefetch.get(0)


def test_prefetch_reraises_an_error_in_the_caller():
    def fn(k):
        if k == 1:
            raise ValueError("bad step")
        return k

    prefetch = Prefetch(fn)
    assert prefetch.get(0) == 0
    with pytest.raises(ValueError, match="bad step"):
        prefetch.get(1)
    prefetch.close()


def test_coupled_source_with_prefetch_equals_without():
    X, Y = torch.randn(40, 2), torch.arange(40) % 3
    stream = BatchStream(40, 8, seed=1)
    source = CoupledSource(MemoryRows(X, Y, stream.global_indices), _draws(), ExactCoupling(),
                           slice(None), class_cond=True)
    inline = [source(k) for k in range(5)]
    with source.start_prefetch(end=5):
        ahead = [source(k) for k in range(5)]
    for a, b in zip(inline, ahead):
        assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("x0", "x1", "t", "y", "drop"))
    x0, x1, _, y, _ = source.global_batch(2)
    plain = _draws().draw(2)[0]
    perm = (x0[:, None] == plain[None]).all(-1).nonzero()[:, 1]
    assert _is_permutation(perm, 8) and torch.equal(y[perm], y)  # within classes


def test_coupled_batches_pair_each_batch_by_ot_and_prefetch_it():
    data = torch.randn(300, 2) * 3
    labels = torch.arange(300) % 4
    coupling = ExactCoupling()
    with CoupledBatches(data, labels, batch_size=32, coupling=coupling, seed=7, steps=5) as batches:
        got = list(batches)
    assert len(got) == 5
    for k, (x0, x1, y) in enumerate(got):
        again = batches.batch(k)  # a pure function of k, whether prefetched or not
        assert all(torch.equal(a, b) for a, b in zip((x0, x1, y), again))
        idx = BatchStream(300, 32, 7).global_indices(k)
        assert torch.equal(x1, data[idx]) and torch.equal(y, labels[idx])
        noise = torch.randn(32, 2, generator=step_generator(7, k))
        perm = (x0[:, None] == noise[None]).all(-1).nonzero()[:, 1]
        assert _is_permutation(perm, 32) and torch.equal(y, y[perm])
        assert pair_cost(x0, x1) < pair_cost(noise, x1)
    x0, x1, y = next(iter(CoupledBatches(data, batch_size=16, coupling=coupling, start=3)))
    assert y is None and torch.equal(x1, data[BatchStream(300, 16, 0).global_indices(3)])


def test_coupled_batches_are_the_trainers_coupled_batches(tmp_path):
    """An unconditional toy run without flips: CoupledBatches(seed) reproduces the Trainer's pairs."""
    trainer = Trainer(toy_cfg(tmp_path, coupling={"name": "exact"}), progress=False)
    X = trainer.memory[0]
    with CoupledBatches(X, batch_size=trainer.global_batch, coupling=trainer.coupling,
                        seed=trainer.cfg.seed, steps=3) as batches:
        for k, (x0, x1, _) in enumerate(batches):
            want = trainer.batch_source(k).global_batch(k)
            assert torch.equal(x0, want[0]) and torch.equal(x1, want[1])
