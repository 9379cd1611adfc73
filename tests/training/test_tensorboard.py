"""train.log.tensorboard: the event files hold metrics.jsonl's numbers and the sample grids, read
back with TensorBoard's own reader; a resume continues them; without the package, one clear error."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image
from train_fixtures import toy_cfg

from flowmatch.config import config_to_dict
from flowmatch.training import Trainer

KEYS = ("loss", "last_loss", "lr", "grad_norm", "samples_per_s")


def _events(folder):
    """TensorBoard's own reader over every event file in ``folder``."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    IMAGES, SCALARS, EventAccumulator = reader.IMAGES, reader.SCALARS, reader.EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0})  # 0: keep every event
    acc.Reload()
    return acc


def test_scalars_equal_metrics_and_grids_are_images_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = toy_cfg(tmp_path, keep_every=4, log={"tensorboard": True})  # logs at 2, 4, ..., 12; grids at 6, 12
    run = tmp_path / "run"
    assert Trainer(cfg, progress=False).fit().status == "finished"
    # Lose steps 9-12: back to the step-8 snapshot; the resumed launch logs 10, 12 again (new speeds)
    shutil.copy(run / "checkpoints" / "step_0000008.pt", run / "checkpoints" / "latest.pt")
    assert Trainer(cfg, progress=False).fit().step == 12
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file a launch

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    acc = _events(run / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {f"train/{k}" for k in KEYS}
    for key in KEYS:
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in records], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6), key
    images = acc.Images("samples")
    assert [e.step for e in images] == [6, 12]
    with Image.open(run / "samples.png") as final:
        assert (images[-1].width, images[-1].height) == final.size


def test_off_by_default(tmp_path):
    Trainer(toy_cfg(tmp_path, steps=2, sample_every=0), progress=False).fit()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_missing_package_is_one_clear_error_at_start(tmp_path):
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(toy_cfg(tmp_path, steps=2))))
    code = ("import sys\n"
            "sys.modules['tensorboard'] = None\n"
            "sys.modules['torch.utils.tensorboard'] = None\n"
            "from flowmatch.cli import main\n"
            f"sys.exit(main(['train', {str(cfg_file)!r}, 'train.log.tensorboard=true', '--no-progress']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'flowmatch[tensorboard]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any work
