"""The package table (docs/design.md §2) as a checked contract: what each package may import of the
others, read from every module's import statements; and the vocabularies two packages keep apart because
the table forbids one to import the other (the installation task states of the hub and the device); that
the others use only `signing`'s public API; and what the installer on the device loads at start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import signing
from hub import tasks as hub_tasks
from mers import tasks as device_tasks

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("signing", "board", "factory", "mers", "hub")

#: each package's allowed imports of the others: a package, or one module of it
ALLOWED: dict[str, frozenset[str]] = {
    "signing": frozenset(),
    "board": frozenset({"signing"}),
    "factory": frozenset({"board.protocol", "signing"}),
    "mers": frozenset({"signing", "board"}),
    "hub": frozenset({"signing"}),
}


def imported_names(path: Path) -> set[str]:
    """Every name of ours `path` imports, qualified: `import board.slots` is `board.slots`, `from board
    import protocol` is `board.protocol`, `from signing.keys import load` is `signing.keys.load`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.partition(".")[0] in PACKAGES}


def allowed(package: str, name: str) -> bool:
    if name.partition(".")[0] == package:
        return True
    return any(name == rule or name.startswith(f"{rule}.") for rule in ALLOWED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_the_package_table_allows(package: str) -> None:
    offending = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in imported_names(path)
        if not allowed(package, name)
    }
    assert not offending, sorted(offending)


def test_the_contract_tells_a_forbidden_import_from_an_allowed_one(tmp_path: Path) -> None:
    module = tmp_path / "station.py"
    module.write_text(
        "from board import protocol\nfrom board.keystore import KeyStore\nimport hub.tasks\nimport board\n"
    )
    names = imported_names(module)
    assert names == {"board.protocol", "board.keystore.KeyStore", "hub.tasks", "board"}
    assert {name for name in names if not allowed("factory", name)} == {
        "board.keystore.KeyStore",
        "hub.tasks",
        "board",
    }
    assert all(allowed("mers", name) for name in names - {"hub.tasks"})


def test_the_hub_and_the_device_name_and_order_the_task_states_alike() -> None:
    assert [(state.name, state.value) for state in hub_tasks.TaskState] == [
        (state.name, state.value) for state in device_tasks.TaskState
    ]
    assert [state.value for state in hub_tasks.PROGRESSION] == [
        state.value for state in device_tasks.PROGRESSION
    ]
    assert {state.value for state in hub_tasks.CLOSED} == {
        state.value for state in device_tasks.CLOSED_STATES
    }


#: what the installer on the device never needs: the provisioning console's wire format and its SMP stack
#: (with pydantic), which cost seconds of start-up on a gateway's CPU at every `mers` command
CONSOLE_ONLY = ("board.protocol", "board.console", "smp", "pydantic", "cbor2")


def test_the_installer_on_the_device_does_not_load_the_console_wire_format() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mers.cli; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [name for name in loaded if name.partition(".")[0] in CONSOLE_ONLY or name in CONSOLE_ONLY] == []


@pytest.mark.parametrize("package", ("board", "factory", "mers", "hub"))
def test_other_packages_use_only_the_public_api_of_signing(package: str) -> None:
    """`signing` owns the image format, its layout and manifest readers, and the verdict on an image
    (`ImageVerifier`): the others import what its `__all__` names, never one of its modules."""
    offending = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in imported_names(path)
        if name.partition(".")[0] == "signing" and name.partition(".")[2] not in signing.__all__
    }
    assert not offending, sorted(offending)
