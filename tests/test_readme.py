"""The README's Python quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_quick_start_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the snippet writes digits.onnx
    try:
        namespace: dict[str, object] = {}
        exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert (tmp_path / "digits.onnx").is_file()
    assert namespace["q"] is not None and namespace["report"] is not None
