"""The README's first commands are what CI runs: keep them from drifting apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_installs_as_the_readme_says_and_runs_its_test_command():
    install, test = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.split(" && gaqat ")[0] in ci
    assert test.split(" && ", 1)[1] in ci
