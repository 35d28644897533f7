"""`mers-demo`: the firmware life of one gateway, end to end, on this machine.

It drives the real commands as subprocesses, exactly as their users would: the hub operator's `mers-hub`,
the release engineer's `mers-sign`, a simulated board served on a pseudo-terminal by `mers-board`, the
factory's `mers-factory`, and the device's `mers`. It imports nothing of the other packages, so it proves
the command lines and the package boundaries of docs/design.md §2 at once.

Each step prints one line: its result, its name, its time and what it found. The exit code is 0 only if
every step did what it should; the first one that does not stops the demo, says why, and shows the end of
the failing command's output. Everything happens in a temporary directory removed at the end, or in
`--keep DIR`, left for inspection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

SERIAL: Final = "GW-DEMO-0001"
VENDOR: Final = "acme.example"
HARDWARE_CLASS: Final = "gateway-demo"
SLOT_SIZE: Final = "8MiB"
PAYLOAD_BYTES: Final = 2 * 1024 * 1024
COMMAND_TIMEOUT_S: Final = 120.0
STARTUP_TIMEOUT_S: Final = 30.0
OUTPUT_TAIL_LINES: Final = 15
NOT_CONFIRMED_EXIT: Final = 8  # `mers confirm`: the new firmware is not (or no longer) on trial as good
MAX_TRIAL_BOOTS: Final = 10


class DemoFailed(Exception):
    """A step did not do what it should; the message says what happened instead."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass
class StepResult:
    name: str
    seconds: float
    ok: bool
    detail: str


@dataclass
class Demo:
    """The work directory, the running background processes and the steps done so far."""

    work: Path
    echo: Callable[[str], None]
    steps: list[StepResult] = field(default_factory=list)
    background: list[subprocess.Popen[str]] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    # --- running commands

    def program(self, name: str) -> str:
        """The console script installed beside this interpreter (or on PATH)."""
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
        found = shutil.which(name)
        if found is None:
            raise DemoFailed(f"{name} is not installed: pip install 'mers[hub,factory]'")
        return found

    def environment(self) -> dict[str, str]:
        return {**os.environ, "MERS_BOARD": str(self.work / "gw1"), "MERS_HUB_DIR": str(self.work / "hub")}

    def run(self, program: str, *arguments: str, expect: int = 0) -> str:
        """Run one command to its end in the work directory; its stdout, or `DemoFailed`."""
        argv = [self.program(program), *arguments]
        try:
            done = subprocess.run(
                argv,
                cwd=self.work,
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as expired:
            raise DemoFailed(f"`{_shown(argv)}` did not finish in {COMMAND_TIMEOUT_S:.0f} s") from expired
        if done.returncode != expect:
            raise DemoFailed(
                f"`{_shown(argv)}` exited {done.returncode} (expected {expect})", done.stdout + done.stderr
            )
        return done.stdout

    def run_json(self, program: str, *arguments: str) -> Any:
        output = self.run(program, *arguments)
        try:
            return json.loads(output)
        except json.JSONDecodeError as error:
            raise DemoFailed(f"{program} {arguments[0]} printed no JSON", output) from error

    def start(self, program: str, *arguments: str) -> subprocess.Popen[str]:
        """A long-running command (the hub, a board's console), stopped when the demo ends."""
        process = subprocess.Popen(
            [self.program(program), *arguments],
            cwd=self.work,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.background.append(process)
        return process

    def stop(self, process: subprocess.Popen[str]) -> None:
        """SIGTERM, as an operator would; SIGKILL only if it does not stop in time."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
        if process in self.background:
            self.background.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.background)):
            self.stop(process)

    # --- steps

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Time one step and print its line; the body appends what it found to the yielded list."""
        found: list[str] = []
        started = time.monotonic()
        try:
            yield found
        except DemoFailed as failure:
            self._record(name, started, ok=False, detail=str(failure))
            raise
        self._record(name, started, ok=True, detail="; ".join(found))

    def _record(self, name: str, started: float, *, ok: bool, detail: str) -> None:
        result = StepResult(name, time.monotonic() - started, ok, detail)
        self.steps.append(result)
        mark = "ok  " if ok else "FAIL"
        line = f"{mark} {len(self.steps):2d}. {name:<50} {result.seconds:6.2f} s"
        self.echo(f"{line}  {detail}" if detail else line)


def _shown(argv: Sequence[str]) -> str:
    return " ".join([Path(argv[0]).name, *argv[1:]])


def _wait_for_file(path: Path, process: subprocess.Popen[str], what: str) -> str:
    """The content of `path` once `process` has written it (polled with a deadline)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise DemoFailed(f"{what} exited {process.returncode}", _drain(process))
        time.sleep(0.05)
    raise DemoFailed(f"{what} did not start in {STARTUP_TIMEOUT_S:.0f} s")


def _first_line(process: subprocess.Popen[str], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise DemoFailed(f"{what} printed nothing", _drain(process))
    return line


def _drain(process: subprocess.Popen[str]) -> str:
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        out, err = process.communicate(timeout=5)
        return (out or "") + (err or "")
    return ""


def _write_payload(path: Path, size: int, seed: bytes) -> None:
    """A firmware payload: incompressible bytes, different for each release."""
    with path.open("wb") as payload:
        payload.write(seed)
        payload.write(os.urandom(size - len(seed)))


# --- the story ----------------------------------------------------------------------------------------


def set_up_hub(demo: Demo) -> None:
    with demo.step("hub: init (keys, TLS CA, admin token)") as found:
        demo.run("mers-hub", "init", "hub", "--hostname", "localhost")
        found.append("hub/ca.pem, hub/admin-token (0600)")
    with demo.step("hub: serve on 127.0.0.1 (HTTPS, a free port)") as found:
        server = demo.start("mers-hub", "serve", "hub", "--port", "0", "--log-level", "warning")
        demo.facts["hub_url"] = _wait_for_file(demo.work / "hub" / "url", server, "mers-hub serve")
        found.append(demo.facts["hub_url"])


def sign_releases(demo: Demo) -> None:
    with demo.step("release engineer: RSA-3072 release key") as found:
        demo.run("mers-sign", "keygen", "-o", "release.pem")
        fingerprint = demo.run("mers-sign", "getpub", "release.pem", "--format", "hash").strip()
        found.append(f"key hash {fingerprint[:16]}…")
    with demo.step("release engineer: sign 1.1.0 and 1.2.0") as found:
        for version, counter in (("1.1.0", "1"), ("1.2.0", "2")):
            _write_payload(demo.work / f"rootfs-{version}.img", PAYLOAD_BYTES, version.encode())
            demo.run(
                "mers-sign", "sign", "--key", "release.pem", "--version", version,
                "--security-counter", counter, "--vendor", VENDOR, "--class", HARDWARE_CLASS,
                f"rootfs-{version}.img", f"rootfs-{version}.signed",
            )  # fmt: skip
            demo.run(
                "mers-sign", "verify", "--key", "release.pub.pem", "--vendor", VENDOR,
                "--class", HARDWARE_CLASS, f"rootfs-{version}.signed",
            )  # fmt: skip
        found.append(f"2 x {PAYLOAD_BYTES // 1024 // 1024} MiB, verified")
    with demo.step("hub: trust the release key") as found:
        demo.run("mers-hub", "release", "trust", "add", "release.pub.pem", "--name", "demo-release")
        found.append("uploads must be signed by it")


def provision_board(demo: Demo) -> None:
    with demo.step("board: a new simulated gateway") as found:
        demo.run(
            "mers-board", "sim", "create", "gw1", "--serial", SERIAL, "--vendor", VENDOR,
            "--class", HARDWARE_CLASS, "--slot-size", SLOT_SIZE,
        )  # fmt: skip
        found.append(f"{SERIAL}, slots a/b of {SLOT_SIZE}, unlocked")
    with demo.step("board: console on a pseudo-terminal") as found:
        console = demo.start("mers-board", "sim", "serve", "gw1", "--json")
        port = str(json.loads(_first_line(console, "mers-board sim serve"))["port"])
        found.append(port)
    with demo.step("factory: provision (key, boarding, CA; lock)") as found:
        events = demo.run(
            "mers-factory", "provision", "--port", port, "--key", "release.pub.pem",
            "--hub", demo.facts["hub_url"], "--hub-token-file", "hub/admin-token", "--hub-ca", "hub/ca.pem",
            "--records", "factory-records.db", "--new-records", "--station", "demo", "--json",
        )  # fmt: skip
        done = [json.loads(line) for line in events.splitlines() if '"done"' in line]
        if not done or done[-1].get("status") != "provisioned":
            raise DemoFailed("the station did not report the board provisioned", events)
        found.append(f"{len(events.splitlines())} steps, locked")
    demo.stop(console)
    with demo.step("factory: audit the records") as found:
        found.append(demo.run("mers-factory", "records", "verify", "--records", "factory-records.db").strip())


def onboard_device(demo: Demo) -> None:
    with demo.step("device: onboard with the factory's IAT") as found:
        demo.run("mers", "onboard")
        status = demo.run_json("mers", "status", "--json")
        found.append(f"{status.get('profile')}, agent {status.get('client_id')}")


def deploy(demo: Demo, version: str) -> str:
    """Upload the release and create its installation task; the task's id."""
    with demo.step(f"hub: upload {version}, task for {SERIAL}") as found:
        release = demo.run_json("mers-hub", "release", "upload", f"rootfs-{version}.signed", "--json")
        task = demo.run_json(
            "mers-hub", "task", "create", "--device", SERIAL, "--release", release["id"], "--json"
        )
        found.append(f"task {task['id']} {task['state']}")
        return str(task["id"])


def boot(demo: Demo, expected_reason: str) -> dict[str, Any]:
    """Power the board on once, as U-Boot would; the bootloader's decision."""
    decision: dict[str, Any] = demo.run_json("mers-board", "boot", "gw1", "--json")
    if decision.get("outcome") != "booted" or decision.get("reason") != expected_reason:
        raise DemoFailed(f"expected a {expected_reason} boot, the bootloader said: {decision.get('message')}")
    return decision


def task_state(demo: Demo, task_id: str) -> str:
    return str(demo.run_json("mers-hub", "task", "show", task_id, "--json")["state"])


def running_version(demo: Demo) -> str:
    """The version of the slot the board runs, from `mers status`."""
    firmware = demo.run_json("mers", "status", "--json").get("firmware", {})
    running = [slot for slot in firmware.get("slots", []) if slot.get("name") == firmware.get("running_slot")]
    return str(running[0].get("version")) if running else "nothing"


def install(demo: Demo, version: str, task_id: str) -> None:
    with demo.step(f"device: install {version} (stream, verify, switch)") as found:
        demo.run("mers", "install", "--task", task_id, "--no-progress")
        found.append(f"task {task_state(demo, task_id)}, inactive slot written, boot env armed")
    with demo.step(f"board: reboot into {version} (trial boot)") as found:
        decision = boot(demo, "trial")
        found.append(f"slot {decision['slot']}, bootcount {decision['bootcount']}/{decision['bootlimit']}")


def update_that_works(demo: Demo) -> None:
    task_id = deploy(demo, "1.1.0")
    install(demo, "1.1.0", task_id)
    with demo.step("device: confirm 1.1.0 (health check passes)") as found:
        demo.run("mers", "confirm", "--health-hook", "true")
        state = task_state(demo, task_id)
        if state != "ACTIVATED":
            raise DemoFailed(f"the task is {state}, not ACTIVATED")
        found.append(f"ACTIVATED, running {running_version(demo)}")
        demo.facts["summary_1.1.0"] = "1.1.0 installed, confirmed, ACTIVATED"


def update_that_fails(demo: Demo) -> None:
    task_id = deploy(demo, "1.2.0")
    install(demo, "1.2.0", task_id)
    with demo.step("device: confirm 1.2.0 (health check fails)") as found:
        demo.run("mers", "confirm", "--health-hook", "false", expect=NOT_CONFIRMED_EXIT)
        found.append("not committed: left to the bootloader")
    with demo.step("board: reboots until the bootloader rolls back") as found:
        boots = 1
        while True:
            boots += 1
            decision: dict[str, Any] = demo.run_json("mers-board", "boot", "gw1", "--json")
            if decision.get("reason") == "rollback":
                break
            if boots > MAX_TRIAL_BOOTS:
                raise DemoFailed(f"no rollback after {boots} boots: {decision.get('message')}")
            demo.run("mers", "confirm", "--health-hook", "false", expect=NOT_CONFIRMED_EXIT)
        found.append(f"after {boots} boots, back on slot {decision['slot']}")
    with demo.step("device: confirm reports the rollback") as found:
        demo.run("mers", "confirm", "--health-hook", "true", expect=NOT_CONFIRMED_EXIT)
        state = task_state(demo, task_id)
        if state != "FAILED":
            raise DemoFailed(f"the task is {state}, not FAILED")
        version = running_version(demo)
        if version.split("+")[0] != "1.1.0":
            raise DemoFailed(f"the board runs {version}, not 1.1.0")
        found.append(f"FAILED, still running {version}")
        demo.facts["summary_1.2.0"] = f"1.2.0 failed its health check, rolled back, FAILED; {version} runs"


def story(demo: Demo) -> None:
    set_up_hub(demo)
    sign_releases(demo)
    provision_board(demo)
    onboard_device(demo)
    update_that_works(demo)
    update_that_fails(demo)


def run_demo(work: Path, echo: Callable[[str], None]) -> bool:
    demo = Demo(work, echo)
    started = time.monotonic()
    try:
        story(demo)
    except DemoFailed as failure:
        tail = failure.output.strip().splitlines()[-OUTPUT_TAIL_LINES:]
        for line in tail:
            echo(f"     | {line}")
        echo(
            f"mers-demo: failed after {len(demo.steps)} steps ({time.monotonic() - started:.1f} s): {failure}"
        )
        return False
    finally:
        demo.stop_all()
    summary = "; ".join(value for key, value in demo.facts.items() if key.startswith("summary_"))
    echo(f"mers-demo: all {len(demo.steps)} steps did what they should ({time.monotonic() - started:.1f} s)")
    echo(f"mers-demo: {summary}")
    return True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Work in DIR (new or empty) and keep it: the hub, the board, the keys, the records.",
)
def main(keep: Path | None) -> None:
    """Run the firmware life of a gateway on this machine: hub, signing, factory, onboarding, updates.

    Every step drives the real commands as subprocesses. Exit code 0 only if every step did what it
    should.
    """
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise click.UsageError(f"{keep} is not empty")
        keep.mkdir(parents=True, exist_ok=True)
        ok = run_demo(keep.absolute(), click.echo)
        click.echo(f"mers-demo: everything is kept in {keep}")
    else:
        with tempfile.TemporaryDirectory(prefix="mers-demo-") as temporary:
            ok = run_demo(Path(temporary), click.echo)
    sys.exit(0 if ok else 1)


__all__ = ["Demo", "DemoFailed", "main", "run_demo"]
