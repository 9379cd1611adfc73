"""Checkpoints: atomic writes; truncated, foreign and malicious files give clear errors."""

import pickle

import pytest
import torch

from flowmatch.training import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_round_trip_and_no_temp_files_left(tmp_path):
    p = save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}}, tmp_path / "c" / "latest.pt")
    state = load_checkpoint(p)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [f.name for f in p.parent.iterdir()] == ["latest.pt"]


def test_truncated_checkpoint(tmp_path):
    p = save_checkpoint({"step": 1, "model": {"w": torch.randn(1000)}}, tmp_path / "latest.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(p)


def test_foreign_checkpoint_without_marker(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, p)
    with pytest.raises(CheckpointError, match="not a flowmatch checkpoint"):
        load_checkpoint(p)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"format": "flowmatch-checkpoint-v1", "x": _Payload()}, p)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(p)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    # A plain pickle file (not a torch zip) is refused too.
    q = tmp_path / "plain.pkl"
    q.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(q)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(tmp_path)
