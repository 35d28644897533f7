"""Helpers for the installer's tests: an onboarded simulated gateway that trusts a release key, releases
uploaded to a real hub and tasks for them, a TCP proxy that cuts connections at chosen byte offsets, and a
driver that runs the installer or the confirm step in a process of its own (`tests.forked_process`) and
SIGKILLs itself at a chosen step (a power cut at a known point)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from board.bootloader import BootOutcome, BootResult, boot
from board.interface import Identity, SlotName
from board.simboard import SimBoard
from mers.client import DeviceClient
from mers.clock import HubClock
from mers.confirm import Confirmer, ConfirmStep
from mers.download import DownloadSettings
from mers.install import Installer, InstallSettings, InstallStep
from signing.image_format import ImageVersion
from signing.keys import KeyAlgorithm, SoftwareSigner
from tests.conftest import CliResult, run_cli
from tests.device_helpers import FAST, Gateway, boarding_data
from tests.firmware_helpers import new_task, trust, upload
from tests.hub_helpers import FIRMWARE, RunningHub, create_agent
from tests.signing_helpers import make_image, signer_for

IDENTITY = Identity("SN-INSTALL-1", "acme.example", "gateway-g1", "B")
SLOT_SIZE = 4 << 20
PAYLOAD_SIZE = 1536 << 10  # 1.5 MiB: several chunks and checkpoints, fast to hash

#: small chunks and frequent checkpoints, so a small image has many resume and kill points
TEST_DOWNLOAD = DownloadSettings(
    chunk_size=64 << 10,
    connect_timeout=5.0,
    read_timeout=5.0,
    retries=4,
    backoff_factor=0.01,
    backoff_max=0.05,
    backoff_jitter=0.01,
)
TEST_INSTALL = InstallSettings(download=TEST_DOWNLOAD, checkpoint_bytes=256 << 10, report_seconds=0.0)


@dataclass
class Rig:
    """A hub, a release key it and the board trust, and an onboarded simulated gateway."""

    hub: RunningHub
    gateway: Gateway
    signer: SoftwareSigner
    directory: Path
    _count: int = 0

    @property
    def board(self) -> SimBoard:
        return SimBoard.open(self.gateway.path)

    def client(self, **options: Any) -> DeviceClient:
        return self.gateway.client(**options)

    def image(
        self,
        version: str,
        *,
        counter: int | None = None,
        signer: SoftwareSigner | None = None,
        image_class: str | None = None,
        size: int = PAYLOAD_SIZE,
    ) -> Path:
        self._count += 1
        return make_image(
            self.directory,
            [signer or self.signer],
            payload=os.urandom(size),
            name=f"image-{self._count}-{version}.signed",
            version=ImageVersion.parse(version),
            security_counter=counter,
            vendor=IDENTITY.vendor,
            image_class=image_class or IDENTITY.image_class,
        )

    def release(self, image: Path) -> dict[str, Any]:
        response = upload(self.hub, image, name=image.name)
        assert response.status_code == 201, response.text
        release: dict[str, Any] = response.json()
        return release

    def task_for(self, image: Path) -> str:
        task_id: str = new_task(self.hub, self.gateway.agent_id, self.release(image)["id"])["id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.hub.admin("GET", f"{FIRMWARE}/installationTasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def boot(self) -> BootResult:
        """Power the board on once; it must boot something."""
        result = boot(self.board)
        assert result.decision.outcome is BootOutcome.BOOTED, result.message
        return result

    def mers(self, *args: str | Path) -> CliResult:
        return run_cli("mers", *args, "--board", self.gateway.path, "--retries", "2", "--timeout", "10")


def make_rig(hub: RunningHub, directory: Path, *, slot_size: int = SLOT_SIZE, onboard: bool = True) -> Rig:
    """A board whose slot a holds release 1.0.0 (counter 1), key slot 0 the release key, and boarding
    data for `hub`; onboarded unless `onboard` is False."""
    directory.mkdir(parents=True, exist_ok=True)
    signer = signer_for(KeyAlgorithm.ED25519)
    trust(hub, signer)
    factory = make_image(
        directory,
        [signer],
        payload=os.urandom(64 << 10),
        name="factory.signed",
        version=ImageVersion.parse("1.0.0"),
        security_counter=1,
        vendor=IDENTITY.vendor,
        image_class=IDENTITY.image_class,
    )
    agent = create_agent(hub, f"gw-{directory.name}")
    board = SimBoard.create(directory / "board", IDENTITY, slot_size=slot_size, image=factory)
    board.write_key(0, signer.public_key.der)
    board.write_boarding_data(boarding_data(hub, agent["id"]))
    gateway = Gateway(board, agent["id"], hub)
    if onboard:
        with gateway.client(settings=FAST) as client:
            client.onboard()
    return Rig(hub, gateway, signer, directory)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slot_files(board: SimBoard, name: SlotName) -> tuple[str, bytes | None]:
    """A slot's content digest and its record file, to prove a slot untouched."""
    slot = board.config.slot(name)
    record = slot.record.read_bytes() if slot.record.exists() else None
    return file_digest(slot.device), record


#: runs a command from a small, fresh interpreter and prints its peak RSS: a child's ru_maxrss starts at its
#: parent's RSS, so measuring straight from the pytest process would report pytest's memory
_RSS_LAUNCHER = """
import resource, subprocess, sys
completed = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(completed.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(completed.returncode)
"""


def mers_peak_rss_kib(rig: Rig, *args: str | Path) -> int:
    """Peak resident memory of one `mers ARGS --board BOARD` run, in KiB."""
    program = Path(sys.executable).parent / "mers"
    argv = [str(program), *map(str, args), "--board", str(rig.gateway.path)]
    completed = subprocess.run([sys.executable, "-c", _RSS_LAUNCHER, *argv], capture_output=True, check=False)
    assert completed.returncode == 0, completed.stderr.decode()
    return int(completed.stdout)


#: sets RLIMIT_FSIZE, then becomes the command (no preexec_fn in a threaded pytest process)
_FSIZE_LAUNCHER = """
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


def mers_with_file_size_limit(rig: Rig, limit: int, *args: str | Path) -> CliResult:
    """`mers ARGS --board BOARD` as a real process whose writes past byte `limit` of any file fail with
    EFBIG (RLIMIT_FSIZE: the kernel's own failure, like a device that stops taking writes; Python ignores
    SIGXFSZ, so the write returns the error). The journal and state files are far smaller."""
    completed = subprocess.run(
        _file_size_limited(rig, limit, *args),
        capture_output=True,
        check=False,
        timeout=300,
    )
    return CliResult(
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )


def start_mers_with_file_size_limit(rig: Rig, limit: int, *args: str | Path) -> subprocess.Popen[str]:
    """`mers_with_file_size_limit`, started and left running (the daemon), its stderr a text pipe."""
    return subprocess.Popen(
        _file_size_limited(rig, limit, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _file_size_limited(rig: Rig, limit: int, *args: str | Path) -> list[str]:
    program = Path(sys.executable).parent / "mers"
    argv = [str(program), *map(str, args), "--board", str(rig.gateway.path), "--retries", "2"]
    return [sys.executable, "-c", _FSIZE_LAUNCHER, str(limit), *argv]


# --- power cuts in-process ----------------------------------------------------------------------------


class PowerCut(BaseException):
    """Nothing after the step runs (a BaseException, so no `except Exception` can swallow it)."""


def cut_at(step: InstallStep) -> Callable[[InstallStep], None]:
    """An installer hook that cuts the power when the install reaches `step`."""

    def hook(seen: InstallStep) -> None:
        if seen is step:
            raise PowerCut(step)

    return hook


def install_file_and_confirm(rig: Rig, image: Path, version: str) -> None:
    """`mers install --file`, a simulated boot and `mers confirm`: `version` runs, committed."""
    installed = rig.mers("install", "--file", image, "--no-progress")
    assert installed.returncode == 0, installed.stderr
    rig.boot()
    assert rig.mers("confirm").returncode == 0
    record = rig.board.slot(rig.board.active_slot()).record()
    assert record is not None and record.version == version


def interrupted_task_install(rig: Rig, step: InstallStep, version: str = "2.0.0") -> str:
    """A task for a new release (counter 3) whose install lost power at `step`; its id."""
    task_id = rig.task_for(rig.image(version, counter=3))
    with rig.client() as client, pytest.raises(PowerCut):
        Installer(rig.board, client, settings=TEST_INSTALL, hook=cut_at(step)).install_task(task_id)
    return task_id


# --- a TCP proxy that cuts connections ------------------------------------------------------------------


@dataclass
class CuttingProxy:
    """Forwards 127.0.0.1:`port` to the target, and cuts the connection (both sides closed) that carries
    the byte number `cuts[i]` of all the bytes sent to clients. Counts every byte sent to clients."""

    port: int
    cuts: list[int]
    sent_to_clients: int = 0
    connections: int = 0
    performed: list[int] = field(default_factory=list)


@contextmanager
def cutting_proxy(target_port: int, cuts: list[int]) -> Iterator[CuttingProxy]:
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = CuttingProxy(listener.getsockname()[1], sorted(cuts))
    lock = threading.Lock()
    stop = threading.Event()

    def upstream(client: socket.socket, server: socket.socket) -> None:
        while data := client.recv(65536):
            server.sendall(data)

    def allowed(size: int) -> tuple[int, bool]:
        """How much of `size` bytes may go before the next cut, and whether the cut falls there."""
        with lock:
            pending = [cut for cut in proxy.cuts if cut not in proxy.performed]
            if pending and proxy.sent_to_clients + size >= pending[0]:
                proxy.performed.append(pending[0])
                size = pending[0] - proxy.sent_to_clients
                proxy.sent_to_clients += size
                return size, True
            proxy.sent_to_clients += size
            return size, False

    def handle(client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", target_port))
        with lock:
            proxy.connections += 1
        threading.Thread(target=_quietly, args=(upstream, client, server), daemon=True).start()
        try:
            while data := server.recv(65536):
                size, cut = allowed(len(data))
                client.sendall(data[:size])
                if cut:
                    break
        except OSError:
            pass
        finally:
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_quietly, args=(handle, client), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def _quietly(function: Any, *args: Any) -> None:
    """A proxy thread ends when either side goes away; that is no error."""
    with contextlib.suppress(OSError):
        function(*args)


# --- the driver: the installer as a real process, killed at a step ------------------------------------------


def install_driver(argv: list[str]) -> int:
    """`BOARD (install TASK | confirm) [--kill-at STEP[:N]]` (in a process of its own,
    `tests.forked_process`): run the
    install of TASK (resuming the journal) or the confirm step, with the tests' small chunks; with
    --kill-at, SIGKILL this process the N-th time (default 1st) the step is reached."""
    parser = argparse.ArgumentParser()
    parser.add_argument("board", type=Path)
    parser.add_argument("action", choices=["install", "confirm"])
    parser.add_argument("task", nargs="?")
    parser.add_argument("--kill-at", default="")
    args = parser.parse_args(argv)
    name, _, count = args.kill_at.partition(":")
    remaining = [int(count or 1)]

    def hook(step: InstallStep | ConfirmStep) -> None:
        if step.value == name:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    board = SimBoard.open(args.board)
    with DeviceClient(board, settings=FAST, clock=HubClock()) as client:
        if args.action == "install":
            result = Installer(board, client, settings=TEST_INSTALL, hook=hook).install_task(args.task)
            print(result.outcome.value)
        else:
            print(Confirmer(board, client, hook=hook).confirm().outcome.value)
    return 0
