"""The documentation site builds with ``mkdocs build --strict``: no broken link, no
unresolved API reference, every tutorial rendered with its figures."""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    # The API reference is generated from the docstrings, examples included.
    guides = text(site / "api" / "guides" / "index.html")
    assert "init_scale" in guides and "sample_posterior" in guides
    density = text(site / "api" / "density" / "index.html")
    assert "context_dim" in density and "flow.sample((7,)).shape" in density
    # Every tutorial is a page with its committed figures.
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = site / "tutorials" / notebook.stem / "index.html"
        assert page.exists(), notebook.name
        assert "data:image/png" in page.read_text(), f"{notebook.name} rendered without figures"
    for page in ["getting-started", "guide/k-hat", "guide/choosing-a-flow", "guide/gpus"]:
        assert (site / page / "index.html").exists(), page


def text(page: Path) -> str:
    """A page's visible text (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
