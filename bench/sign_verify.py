"""Benchmark `mers-sign sign` and `verify` against `openssl dgst -sha256` over the same file.

Hashing the payload dominates signing and verifying (an RSA-3072 signature costs about 1.6 ms), so the
fair peer is OpenSSL hashing the same bytes, and the issue's targets are: sign and verify within 1.3x of
openssl's time, and a peak RSS under 64 MiB at any image size (images are streamed, never loaded).
imgtool is timed too, for comparison only.

This is a report, not a test: it exits 0 whatever the numbers say, and non-zero only when a command
fails. Every figure comes from a real subprocess: wall seconds by `time.perf_counter`, peak RSS from the
`ru_maxrss` that `os.wait4` returns for that child. Run it on an otherwise idle machine.

    .venv/bin/python bench/sign_verify.py --size-mib 512 [--repeat 3] [--keep-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import enum
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TIME_TARGET_RATIO = 1.3
RSS_LIMIT_MIB = 64.0
#: imgtool holds about three copies of the image; below this multiple of free memory it is skipped
IMGTOOL_MEMORY_FACTOR = 4
IMGTOOL_HEADER_SIZE = 0x20
#: room left in imgtool's slot after the padded image, for its TLVs (~1 KiB) and trailer (~0.5 KiB)
IMGTOOL_SLOT_SLACK = 0x10000
DEFAULT_TIMEOUT_S = 900.0

_MIB = 1 << 20
_CHUNK = _MIB
_KEY = "key.pem"
_PUBLIC_KEY = "key.pub.pem"
_IMGTOOL_KEY = "ik.pem"
_PAYLOAD = "payload.bin"
_SIGNED = "signed-mers.bin"
_SIGNED_IMGTOOL = "signed-imgtool.bin"


class BenchError(Exception):
    """Base of the errors that stop the benchmark; `main` prints it and exits non-zero."""


class ToolMissingError(BenchError):
    """A program the benchmark runs is not installed."""


class CommandFailedError(BenchError):
    """A benchmarked or preparatory command exited non-zero (or was killed by the timeout)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"`{' '.join(argv)}` failed (exit {returncode}):\n{stderr.rstrip()}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class Role(enum.Enum):
    """What a measured command is to the report."""

    PEER = "peer"  # openssl: the limit our times are compared with
    TARGETED = "targeted"  # mers-sign: held to the targets
    COMPARISON = "comparison"  # imgtool: ratios printed, no target
    CONTEXT = "context"  # startup cost and the RSS floor, to read the other figures by


@dataclass(frozen=True)
class Step:
    """One command to time, run with the work directory as its current directory."""

    figure: str
    argv: tuple[str, ...]
    role: Role
    reads: str | None = None  # the file it reads, read through (untimed) just before each run
    writes: str | None = None  # the file it writes, removed (untimed) before each run


@dataclass(frozen=True)
class Measurement:
    """A command's best wall time over the timed runs, its largest peak RSS over the same runs, and what
    the best run read from the disk rather than the page cache (non-zero: the time includes disk I/O)."""

    figure: str
    role: Role
    seconds: float
    peak_rss_mib: float
    disk_read_mib: float


@dataclass(frozen=True)
class Row:
    """One figure of the report, in the shape every benchmark of `bench/` returns."""

    figure: str
    ours: float
    peer_or_limit: float | None
    ratio: float | None
    target: str
    met: bool | None


@dataclass(frozen=True)
class Tools:
    mers_sign: Path
    imgtool: Path | None
    openssl: Path


# --- finding the programs ---------------------------------------------------------------------------


def _console_script(name: str, install_hint: str) -> Path:
    """A console script of this environment, found next to the running interpreter (not on PATH, so a
    globally installed copy can never be benchmarked by mistake)."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        raise ToolMissingError(f"{name} is not installed next to {sys.executable} ({install_hint})")
    return path


def _find_tools(with_imgtool: bool) -> Tools:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ToolMissingError("openssl is not on PATH (apt-get install openssl)")
    pip = Path(sys.executable).parent / "pip"
    return Tools(
        mers_sign=_console_script("mers-sign", f"run `{pip} install -e .` in the repository"),
        imgtool=_console_script("imgtool", f"run `{pip} install -e '.[test]'`") if with_imgtool else None,
        openssl=Path(openssl),
    )


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where the kernel does not report it."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # reported in kB
    return None


def imgtool_skip_reason(size_bytes: int, skip_requested: bool) -> str | None:
    """Why imgtool will not be run, or None when it will: it reads the whole image and builds copies of
    it in memory, and driving a machine into swap or the OOM killer would spoil every other figure."""
    if skip_requested:
        return "--skip-imgtool given"
    available = memory_available_bytes()
    needed = IMGTOOL_MEMORY_FACTOR * size_bytes
    if available is not None and available < needed:
        return (
            f"MemAvailable is {available / _MIB:.0f} MiB, below {IMGTOOL_MEMORY_FACTOR}x the image "
            f"({needed / _MIB:.0f} MiB); imgtool needs about 3x the image in RAM"
        )
    return None


# --- running and measuring one command --------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    seconds: float
    peak_rss_mib: float
    disk_read_mib: float


def _kill_after(pid: int, timeout_s: float, done: threading.Event) -> None:
    if not done.wait(timeout_s):
        # The child is not reaped before this thread has been joined, so `pid` cannot have been reused.
        os.kill(pid, signal.SIGKILL)


def run_measured(argv: Sequence[str], cwd: Path, timeout_s: float) -> _Sample:
    """Run `argv` once; its wall time and peak RSS, or CommandFailedError with its stderr.

    The child is waited for with `waitid(WNOWAIT)` first, so the clock stops when it exits, and then
    reaped with `wait4`, whose rusage is that child's (plus any children it reaped itself). Its
    `ru_maxrss` has a floor, though: a child spawned by vfork and exec counts the peak RSS of the address
    space it replaced, which is this process's; see the `true (RSS floor)` row.
    """
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        done = threading.Event()
        watchdog = threading.Thread(target=_kill_after, args=(proc.pid, timeout_s, done), daemon=True)
        watchdog.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        seconds = time.perf_counter() - start
        done.set()
        watchdog.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if proc.returncode != 0:
            stderr.seek(0)
            message = stderr.read().decode("utf-8", "replace")
            if proc.returncode == -signal.SIGKILL:
                message += f"\n(killed after the {timeout_s:.0f} s timeout)"
            raise CommandFailedError(argv, proc.returncode, message)
    return _Sample(
        seconds=seconds,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        disk_read_mib=usage.ru_inblock * 512 / _MIB,  # counted in 512-byte blocks
    )


# --- preparing inputs -------------------------------------------------------------------------------

#: the project's packages whose console scripts the benchmarks time
PROJECT_PACKAGES = ("signing", "board", "mers", "hub", "factory")


def compile_project_bytecode() -> None:
    """Write the bytecode of the project's packages before anything is timed, as pip does when it
    installs a wheel. An editable checkout gets its bytecode at the first run, unless
    PYTHONDONTWRITEBYTECODE is set (as in many CI images and containers): then every timed run would
    compile every module from source again, a cost no installed copy pays (0.05 to 0.1 s per command
    here, half of mers-sign's whole start-up)."""
    for name in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise BenchError(f"the package {name} is not installed next to this interpreter")
        for directory in spec.submodule_search_locations:
            if not compileall.compile_dir(directory, quiet=1):
                raise BenchError(f"the bytecode of {name} could not be compiled (in {directory})")


def write_random_file(path: Path, size_bytes: int) -> None:
    """Fill `path` with `size_bytes` random bytes (incompressible, like a real image), a chunk at a time
    so that the benchmark's own memory stays small: its RSS is inherited as a floor by every child."""
    with path.open("wb") as out:
        left = size_bytes
        while left:
            chunk = min(_CHUNK, left)
            out.write(os.urandom(chunk))
            left -= chunk


def imgtool_slot_size(size_bytes: int) -> int:
    """A slot just large enough for the padded header, the image, the TLVs and the trailer."""
    return IMGTOOL_HEADER_SIZE + size_bytes + IMGTOOL_SLOT_SLACK


def _make_keys(tools: Tools, work: Path, timeout_s: float) -> None:
    run_measured([str(tools.mers_sign), "keygen", "-o", _KEY], work, timeout_s)
    if not (work / _PUBLIC_KEY).exists():
        raise BenchError(f"`mers-sign keygen -o {_KEY}` did not write {_PUBLIC_KEY}")
    if tools.imgtool is not None:
        run_measured([str(tools.imgtool), "keygen", "-k", _IMGTOOL_KEY, "-t", "rsa-3072"], work, timeout_s)


def _steps(tools: Tools, size_bytes: int) -> list[Step]:
    """The commands of one round, openssl first so that the warm-up round reads the file into the page
    cache before anything else touches it."""
    mers = str(tools.mers_sign)
    steps = [
        Step(
            "openssl dgst -sha256",
            (str(tools.openssl), "dgst", "-sha256", _PAYLOAD),
            Role.PEER,
            reads=_PAYLOAD,
        ),
        Step(
            "mers-sign sign",
            (mers, "sign", "--key", _KEY, "--version", "1.0.0", _PAYLOAD, _SIGNED),
            Role.TARGETED,
            reads=_PAYLOAD,
            writes=_SIGNED,
        ),
        Step(
            "mers-sign verify", (mers, "verify", "--key", _PUBLIC_KEY, _SIGNED), Role.TARGETED, reads=_SIGNED
        ),
    ]
    if tools.imgtool is not None:
        imgtool = str(tools.imgtool)
        steps += [
            Step(
                "imgtool sign",
                (
                    imgtool,
                    "sign",
                    "-k",
                    _IMGTOOL_KEY,
                    "--version",
                    "1.0.0",
                    "-H",
                    hex(IMGTOOL_HEADER_SIZE),
                    "--pad-header",
                    "-S",
                    hex(imgtool_slot_size(size_bytes)),
                    _PAYLOAD,
                    _SIGNED_IMGTOOL,
                ),
                Role.COMPARISON,
                reads=_PAYLOAD,
                writes=_SIGNED_IMGTOOL,
            ),
            Step(
                "imgtool verify",
                (imgtool, "verify", "-k", _IMGTOOL_KEY, _SIGNED_IMGTOOL),
                Role.COMPARISON,
                reads=_SIGNED_IMGTOOL,
            ),
        ]
    steps += [
        Step("mers-sign --help (startup)", (mers, "--help"), Role.CONTEXT),
        Step("true (RSS floor)", ("true",), Role.CONTEXT),
    ]
    return steps


# --- the benchmark ----------------------------------------------------------------------------------


@contextmanager
def _work_dir(keep_dir: Path | None) -> Iterator[Path]:
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        yield keep_dir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="mers-bench-") as tmp:
        yield Path(tmp)


def _log(message: str) -> None:
    print(f"sign_verify: {message}", file=sys.stderr, flush=True)


def _read_through(path: Path) -> None:
    buffer = bytearray(_CHUNK)
    with path.open("rb", buffering=0) as source:
        while source.readinto(buffer):
            pass


def _settle(work: Path, step: Step) -> None:
    """Start `step` from the same state every round: the image it writes does not exist yet (freeing a
    large file's blocks is the filesystem's cost, and would be charged to whoever overwrites it); no
    dirty pages are left from an earlier command (imgtool writes a whole image without fsync) for their
    writeback to land on this command's clock; and the file it reads is in the page cache, even on a
    machine that reclaims cached pages soon after their last use (as proactive reclaim does)."""
    if step.writes is not None:
        (work / step.writes).unlink(missing_ok=True)
    os.sync()
    if step.reads is not None:
        _read_through(work / step.reads)


def measure(
    size_mib: int,
    repeat: int,
    *,
    keep_dir: Path | None = None,
    skip_imgtool: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Measurement]:
    """Time every step: one warm-up round that is discarded, then `repeat` rounds, interleaved so that
    a drift in the machine's state hits every command alike. Best time, worst peak RSS."""
    size_bytes = size_mib * _MIB
    skip_reason = imgtool_skip_reason(size_bytes, skip_imgtool)
    if skip_reason is not None:
        _log(f"imgtool skipped: {skip_reason}")
    tools = _find_tools(with_imgtool=skip_reason is None)
    compile_project_bytecode()
    with _work_dir(keep_dir) as work:
        _log(f"writing {size_mib} MiB of random data to {work / _PAYLOAD}")
        write_random_file(work / _PAYLOAD, size_bytes)
        _make_keys(tools, work, timeout_s)
        steps = _steps(tools, size_bytes)
        samples: dict[str, list[_Sample]] = {step.figure: [] for step in steps}
        for round_index in range(repeat + 1):
            _log("warm-up round" if round_index == 0 else f"round {round_index} of {repeat}")
            for step in steps:
                _settle(work, step)
                sample = run_measured(step.argv, work, timeout_s)
                if round_index > 0:
                    samples[step.figure].append(sample)
    return [_summarise(step, samples[step.figure]) for step in steps]


def _summarise(step: Step, samples: Sequence[_Sample]) -> Measurement:
    best = min(samples, key=lambda sample: sample.seconds)
    return Measurement(
        figure=step.figure,
        role=step.role,
        seconds=best.seconds,
        peak_rss_mib=max(sample.peak_rss_mib for sample in samples),
        disk_read_mib=best.disk_read_mib,
    )


def _peer_seconds(measurements: Sequence[Measurement]) -> float:
    return next(m.seconds for m in measurements if m.role is Role.PEER)


def time_met(measurement: Measurement, peer_seconds: float) -> bool:
    return measurement.seconds <= TIME_TARGET_RATIO * peer_seconds


def rss_met(measurement: Measurement) -> bool:
    return measurement.peak_rss_mib < RSS_LIMIT_MIB


def _untargeted_label(role: Role) -> str:
    return f"({role.value})"


def rows_of(measurements: Sequence[Measurement]) -> list[Row]:
    """The report's figures: for each command its time against openssl's and its peak RSS against the
    limit; targets only for mers-sign, ratios alone for imgtool, plain values for the context rows."""
    peer = _peer_seconds(measurements)
    rows: list[Row] = []
    for m in measurements:
        targeted = m.role is Role.TARGETED
        timed_against_peer = m.role is not Role.CONTEXT
        rows.append(
            Row(
                figure=f"{m.figure}: seconds",
                ours=m.seconds,
                peer_or_limit=peer if timed_against_peer else None,
                ratio=m.seconds / peer if timed_against_peer else None,
                target=f"<= {TIME_TARGET_RATIO}x openssl" if targeted else _untargeted_label(m.role),
                met=time_met(m, peer) if targeted else None,
            )
        )
        rows.append(
            Row(
                figure=f"{m.figure}: peak RSS MiB",
                ours=m.peak_rss_mib,
                peer_or_limit=RSS_LIMIT_MIB if targeted else None,
                ratio=m.peak_rss_mib / RSS_LIMIT_MIB if targeted else None,
                target=f"< {RSS_LIMIT_MIB:.0f} MiB" if targeted else _untargeted_label(m.role),
                met=rss_met(m) if targeted else None,
            )
        )
    return rows


def run(
    size_mib: int,
    repeat: int = 3,
    *,
    keep_dir: Path | None = None,
    skip_imgtool: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Row]:
    """The benchmark as `bench/run_all.py` calls it."""
    return rows_of(
        measure(size_mib, repeat, keep_dir=keep_dir, skip_imgtool=skip_imgtool, timeout_s=timeout_s)
    )


# --- output -----------------------------------------------------------------------------------------


def _verdict(m: Measurement, peer_seconds: float) -> tuple[str, str]:
    """The target and met columns of the human table, one line per command."""
    if m.role is not Role.TARGETED:
        return _untargeted_label(m.role), ""
    failed = [name for name, ok in (("time", time_met(m, peer_seconds)), ("RSS", rss_met(m))) if not ok]
    target = f"<= {TIME_TARGET_RATIO}x, < {RSS_LIMIT_MIB:.0f} MiB"
    return target, "yes" if not failed else f"NO ({', '.join(failed)})"


def format_table(measurements: Sequence[Measurement], size_mib: int, repeat: int) -> str:
    peer = _peer_seconds(measurements)
    header = ("figure", "seconds", "peak RSS MiB", "x openssl", "target", "met", "disk read MiB")
    body = []
    for m in measurements:
        ratio = "" if m.role is Role.CONTEXT else f"{m.seconds / peer:.2f}"
        body.append(
            (
                m.figure,
                f"{m.seconds:.3f}",
                f"{m.peak_rss_mib:.1f}",
                ratio,
                *_verdict(m, peer),
                f"{m.disk_read_mib:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    numeric = {1, 2, 3, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rate = size_mib * _MIB / peer / 1e9
    title = (
        f"sign_verify: {size_mib} MiB random payload, best of {repeat} after a warm-up "
        f"(openssl SHA-256 at {rate:.2f} GB/s)"
    )
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, body)])


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: an integer of at least 1 (every bench script uses it)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time mers-sign sign/verify against openssl dgst -sha256 (and imgtool) on a random file.",
        epilog="example: .venv/bin/python bench/sign_verify.py --size-mib 64 --repeat 5",
    )
    parser.add_argument("--size-mib", type=positive_int, default=512, help="payload size (default 512)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed runs, best kept (default 3)")
    parser.add_argument("--keep-dir", type=Path, help="work in DIR and keep the payload, keys and images")
    parser.add_argument("--skip-imgtool", action="store_true", help="do not run imgtool")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds before a command is killed (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        measurements = measure(
            args.size_mib,
            args.repeat,
            keep_dir=args.keep_dir,
            skip_imgtool=args.skip_imgtool,
            timeout_s=args.timeout,
        )
    except BenchError as error:
        print(f"sign_verify: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows_of(measurements)], indent=2))
    else:
        print(format_table(measurements, args.size_mib, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
