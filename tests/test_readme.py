import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # a full fit and 10,000 draws, as a user runs it
def test_readme_quickstart_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no python quickstart"
    namespace: dict = {}  # the README reads top to bottom: later blocks use earlier names
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)


def test_readme_names_the_two_commands_and_ci_runs_them():
    text = README.read_text()
    section = text.split("## Install and run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert commands == ['pip install -e ".[dev]" && pyroflows demo', "python -m pytest"]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"CI does not run the README's command {command!r}"

