"""The installed `visionstream` command is `python -m streams`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = Path(sys.executable).parent / "visionstream"


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_console_command_is_installed_beside_the_interpreter() -> None:
    assert COMMAND.is_file() and os.access(COMMAND, os.X_OK), "run scripts/setup"


def test_help_lists_the_same_commands_as_python_dash_m_streams() -> None:
    installed = run([str(COMMAND), "--help"])
    module = run([sys.executable, "-m", "streams", "--help"])
    assert installed.returncode == module.returncode == 0, installed.stderr
    commands = installed.stdout.split("Commands:", 1)[1]
    assert commands == module.stdout.split("Commands:", 1)[1]
    for name in ("worker", "report", "replay", "train-categorizer", "demo"):
        assert f"  {name} " in commands


def test_a_bad_setting_stops_it_with_the_variable_named() -> None:
    done = run([str(COMMAND), "--help"], VS_ROLE="bogus")
    assert done.returncode == 1
    assert "visionstream: bad setting" in done.stderr and "VS_ROLE" in done.stderr
