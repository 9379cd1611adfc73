"""The README's custom-training-loop example runs as printed and learns the data."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Use it as a library: a custom training loop"


def _example() -> str:
    text = README.read_text()
    assert HEADING in text, "the README section is gone"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
    assert block is not None, "no python block under the heading"
    return block.group(1)


def test_readme_custom_loop_learns_the_data(capsys):
    code = _example()
    assert "steps = 500" in code
    namespace: dict = {}
    exec(compile(code.replace("steps = 500", "steps = 300"), str(README), "exec"), namespace)
    data, samples = namespace["data"], namespace["samples"]
    assert samples.shape == (2000, 2) and torch.isfinite(samples).all()

    def distance_to_data(x):
        return torch.cdist(x, data).min(dim=1).values.mean().item()

    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    assert distance_to_data(samples) < 0.4 * distance_to_data(noise)
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 3 and max(losses[1:]) < losses[0]  # steps 0, 100, 200
