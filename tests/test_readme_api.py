"""The README's "Python API" example runs as written (with a 20-step budget instead of 2000)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    block = text.split("### Python API\n```python\n")[1].split("```")[0]
    assert '"train.steps=2000"' in block
    block = block.replace('"train.steps=2000"', '"train.steps=20", "train.sample_every=0", "device=cpu"')
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md: Python API", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "torch.Size([1000, 2]) 32" in out  # the printed shapes and NFE the comments promise
    assert (tmp_path / "runs" / "toy2d" / "checkpoints" / "latest.pt").is_file()
