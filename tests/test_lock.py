"""requirements.lock agrees with pyproject.toml, and `scripts/lock --check` notices when not."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "scripts" / "lock"), "--check"], capture_output=True, text=True, timeout=60
    )


def _copy_layout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "lock", tmp_path / "scripts" / "lock")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy2(LOCK, tmp_path / "requirements.lock")
    return tmp_path


def test_the_committed_lock_matches_pyproject() -> None:
    done = _check(REPO)
    assert done.returncode == 0, done.stderr


def test_a_changed_dependency_list_fails_the_check(tmp_path: Path) -> None:
    root = _copy_layout(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    pyproject.write_text(text.replace('"pillow>=10",', '"pillow>=11",', 1), encoding="utf-8")
    done = _check(root)
    assert done.returncode == 1 and "run scripts/lock" in done.stderr


def test_other_pyproject_edits_keep_the_lock_valid(tmp_path: Path) -> None:
    root = _copy_layout(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text(encoding="utf-8").replace("line-length = 100", "line-length = 99", 1),
        encoding="utf-8",
    )
    assert _check(root).returncode == 0


def test_every_direct_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"]]
    for extra in ("dev", "offline-models"):
        wanted += project["optional-dependencies"][extra]
    text = LOCK.read_text(encoding="utf-8")
    pins = {
        canonicalize_name(Requirement(m.group(1)).name): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.\-\[\], ]+)==(\S+)", text, flags=re.MULTILINE)
    }
    for spec in wanted:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    # each pin is followed by at least one sha256 hash before the next pin
    blocks = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.MULTILINE)
    unhashed = [b.split()[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=" not in b]
    assert not unhashed, unhashed
