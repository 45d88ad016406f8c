"""The README's command-line examples run as written: every ``slimkit ...`` line of its bash
blocks is run in a scratch folder (through the CLI's own entry point) and must exit 0."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimkit.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
BASH = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
COMMANDS = [
    line.split("#", 1)[0].strip()
    for block in BASH
    for line in block.splitlines()
    if line.strip().startswith("slimkit ")
]


def test_the_readme_has_cli_examples() -> None:
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_cli_example_runs(command: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    if command.startswith("slimkit run recipes/"):  # the recipes ship with the repository
        (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    res = CliRunner().invoke(app, shlex.split(command)[1:])
    assert res.exit_code == 0, f"{command}\n{res.output}\n{res.exception!r}"
    args = shlex.split(command)
    if "--out" in args:  # what the example says it writes is there
        assert (tmp_path / args[args.index("--out") + 1]).exists(), res.output
