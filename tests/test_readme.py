import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # a full fit and 10,000 draws, as a user runs it
def test_readme_quickstart_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no python quickstart"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert 'pip install -e ".[dev]"' in text and "python -m pytest" in text
