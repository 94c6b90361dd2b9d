"""The README's commands are what CI runs, and its library example runs as written."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_library_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    example = text.split("### As a library\n\n```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(example, "README.md (As a library)", "exec"), scope)
    windows = [r for r in scope["records"] if r["kind"] == "window"]
    assert len(windows) == 2 * len(scope["step_sizes"](scope["model"]))  # 100 steps, window 50
    assert torch.isfinite(scope["loss"])


def test_ci_installs_as_the_readme_says_and_runs_its_test_command():
    install, test = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.split(" && gaqat ")[0] in ci
    assert test.split(" && ", 1)[1] in ci
