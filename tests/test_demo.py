"""`mers-demo` runs the whole firmware life of a gateway through the real commands and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(sys.executable).parent / "mers-demo"


def test_the_demo_runs_every_step_and_leaves_nothing_behind_unless_asked(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    done = subprocess.run([DEMO, "--keep", kept], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line[:4] in ("ok  ", "FAIL")]
    assert len(steps) == 20 and all(line.startswith("ok  ") for line in steps), done.stdout
    assert "1.1.0 installed, confirmed, ACTIVATED" in done.stdout
    assert "rolled back, FAILED; 1.1.0+0 runs" in done.stdout
    # what it leaves for inspection: the hub, the board, the keys, the records; no server left running
    assert (kept / "hub" / "ca.pem").exists() and (kept / "gw1").is_dir()
    assert (kept / "factory-records.db").exists()
    assert not (kept / "hub" / "url").exists(), "the hub was not stopped cleanly"


def test_the_demo_refuses_a_keep_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("mine")
    done = subprocess.run([DEMO, "--keep", tmp_path], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "is not empty" in done.stderr
    assert (tmp_path / "something").read_text() == "mine"


def test_the_demo_imports_nothing_of_the_toolkit_it_drives() -> None:
    """It proves the command lines only if it goes through them (docs/design.md §2's boundaries)."""
    probe = (
        "import sys, mers.demo\n"
        "ours = {'signing', 'board', 'hub', 'factory', 'mers'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ours))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['mers', 'mers.demo']"
