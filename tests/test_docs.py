"""The documentation site: its Python examples run as written, and it builds with no warnings.

Every ```python block of a page in ``RUNNABLE`` runs, the page's blocks in order in one namespace
(as a reader runs them), in a scratch folder. A block whose first line is ``# not run: <why>`` is
shown only: the convention is visible on the page itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = [
    "quickstart.md",
    *(f"techniques/{p.name}" for p in sorted(DOCS.glob("techniques/*.md"))),
]
NOT_RUN = "# not run:"


def python_blocks(page: str) -> list[str]:
    """The page's ```python blocks, with the ``# not run:`` ones left out."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    return [b for b in blocks if not b.lstrip().startswith(NOT_RUN)]


def test_every_technique_page_has_a_runnable_example() -> None:
    pages = [p for p in RUNNABLE if p.startswith("techniques/")]
    assert len(pages) >= 8
    assert [p for p in pages if not python_blocks(p)] == []


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_docs_python_examples_run(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"docs/{page} python block {i}", "exec")
        exec(code, namespace)  # noqa: S102 - the project's own documentation


def test_generated_sections_render() -> None:
    sys.path.insert(0, str(DOCS / "_gen"))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS / "_gen"))
    cli = hooks.render("<!-- slimkit:cli -->")
    assert "## `slimkit quantize`" in cli and "`--out`" in cli
    methods = hooks.render("<!-- slimkit:methods -->")
    assert "`quant.ptq`" in methods and "`prune.channel`" in methods and "`finetune`" in methods
    assert "| `ratio` |" in hooks.render("<!-- slimkit:configs -->")
    assert "## Channel pruning" in hooks.render("<!-- slimkit:bench -->")
    with pytest.raises(ValueError, match="unknown docs marker"):
        hooks.render("<!-- slimkit:nothing -->")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed "
                    "(pip install -c constraints.txt -e '.[dev]')")  # fmt: skip
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
    assert "slimkit quantize" in (tmp_path / "site" / "cli" / "index.html").read_text()
