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


# ----------------------------------------------------------------------------------------------
# Reliability: permissions, missing keys, torch's unsafe advice never passed on
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one is restored after."""
    import os

    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_a_new_file_would_get(tmp_path, umask, mask):
    import stat

    from flowmatch.atomic import atomic_open, atomic_write_json

    umask(mask)
    expected = 0o666 & ~mask
    written = [save_checkpoint({"step": 1}, tmp_path / "latest.pt")]
    atomic_write_json(tmp_path / "meta.json", {"a": 1})
    written.append(tmp_path / "meta.json")
    with atomic_open(tmp_path / "distill.json", "w") as f:
        f.write("{}")
    written.append(tmp_path / "distill.json")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other file gets: the yardstick
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def test_a_rewrite_fixes_an_owner_only_file(tmp_path, umask):
    import os
    import stat

    umask(0o022)
    p = save_checkpoint({"step": 1}, tmp_path / "latest.pt")
    os.chmod(p, 0o600)  # as older versions wrote it
    save_checkpoint({"step": 2}, p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert load_checkpoint(p)["step"] == 2


def test_required_keys_are_checked_naming_the_missing_ones_and_the_file(tmp_path):
    from flowmatch.checkpoint import RESUME_KEYS, SAMPLE_KEYS

    p = save_checkpoint({"step": 4, "config": {}, "model": {}, "data_shape": [2]},
                        tmp_path / "latest.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, require=SAMPLE_KEYS)
    message = str(e.value)
    assert str(p) in message and "'ema'" in message and "'num_classes'" in message
    assert "'config'" not in message and len(message.splitlines()) == 1
    with pytest.raises(CheckpointError, match="'ema', 'optimizer', 'num_classes'"):
        load_checkpoint(p, require=RESUME_KEYS)
    assert load_checkpoint(p, require=("step", "config"))["step"] == 4
    assert load_checkpoint(p)["step"] == 4  # nothing required: any flowmatch checkpoint


def test_code_in_a_checkpoint_is_named_without_torchs_unsafe_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save(_Payload(), p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    message = str(e.value)
    assert "not a weights file readable without executing code" in message and str(p) in message
    assert "system" in message  # what the pickle wanted to call
    assert "weights_only" not in message and len(message.splitlines()) == 1
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_read_weights_file_names_what_it_reads(tmp_path):
    from flowmatch.checkpoint import read_weights_file

    with pytest.raises(CheckpointError, match="^digit classifier '.*nope.pt' does not exist$"):
        read_weights_file(tmp_path / "nope.pt", "digit classifier")
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.equal(read_weights_file(tmp_path / "w.pt")["w"], torch.ones(2))
