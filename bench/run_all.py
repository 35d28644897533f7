"""Every benchmark of `bench/` at a size that fits a 2-core machine in a few minutes, in one table.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--json]

Each benchmark is its own script, run as a subprocess with smaller inputs and `--json` (a process of its
own, so one benchmark's memory never shows in another's peak RSS figures: see `sign_verify.py`); the
table has one row per figure: which benchmark, the figure, ours, the peer or limit measured in the same
run, the ratio, the target and whether it is met, then how many targets were met. Like every benchmark
here it is a report: exit code 1 only when a benchmark could not run, whatever the numbers say.
`bench/README.md` explains each figure and gives the full-size commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sign_verify import Row

BENCH_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Benchmark:
    name: str  # the script bench/NAME.py
    size: str  # what "small" means for it, printed so the figures can be compared with bench/README.md
    arguments: tuple[str, ...]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "sign_verify", "512 MiB image (the issue's size), best of 3", ("--size-mib", "512", "--repeat", "3")
    ),
    Benchmark("provision", "115200 baud, 1 board then 8, best of 2", ("--boards", "8", "--repeat", "2")),
    Benchmark(
        "hub_load",
        "200 agents (20 RSA_3072), 128 MiB blob, best of 2",
        ("--agents", "200", "--rsa-agents", "20", "--blob-mib", "128", "--repeat", "2"),
    ),
    Benchmark("install", "256 MiB image from the hub, best of 3", ("--image-mib", "256", "--repeat", "3")),
)


@dataclass(frozen=True)
class Outcome:
    benchmark: str
    seconds: float
    rows: list[Row]
    error: str = ""


def run_benchmark(benchmark: Benchmark) -> Outcome:
    """Run bench/NAME.py --json in a process of its own; its rows, or why there are none."""
    argv = [sys.executable, str(BENCH_DIR / f"{benchmark.name}.py"), *benchmark.arguments, "--json"]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(benchmark.name, time.monotonic() - started, [], f"no result in {TIMEOUT_S:.0f} s")
    seconds = time.monotonic() - started
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return Outcome(benchmark.name, seconds, [], reason)
    try:
        rows = [Row(**row) for row in json.loads(done.stdout)]
    except (ValueError, TypeError) as error:
        return Outcome(benchmark.name, seconds, [], f"unreadable output: {error}")
    return Outcome(benchmark.name, seconds, rows)


def run_benchmarks(selected: Sequence[Benchmark]) -> list[Outcome]:
    outcomes = []
    for benchmark in selected:
        print(f"run_all: {benchmark.name} ({benchmark.size}) ...", file=sys.stderr, flush=True)
        outcomes.append(run_benchmark(benchmark))
    return outcomes


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_report(outcomes: Sequence[Outcome]) -> str:
    header = ("benchmark", "figure", "ours", "peer or limit", "ratio", "target", "met")
    body: list[tuple[str, ...]] = []
    for outcome in outcomes:
        if outcome.error:
            body.append((outcome.benchmark, f"could not run: {outcome.error}", "", "", "", "", "NO"))
        for row in outcome.rows:
            met = "" if row.met is None else ("yes" if row.met else "NO")
            body.append(
                (
                    outcome.benchmark,
                    row.figure,
                    _number(row.ours, 3),
                    _number(row.peer_or_limit, 3),
                    _number(row.ratio, 2),
                    row.target,
                    met,
                )
            )
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *body)
    ]
    timing = ", ".join(f"{outcome.benchmark} {outcome.seconds:.0f} s" for outcome in outcomes)
    return "\n".join([*lines, "", targets_summary(outcomes), f"wall time: {timing}"])


def targets_summary(outcomes: Sequence[Outcome]) -> str:
    """How many targeted figures met their target, naming the ones that did not."""
    targeted = [(o.benchmark, row) for o in outcomes for row in o.rows if row.met is not None]
    missed = [f"{name}: {row.figure}" for name, row in targeted if not row.met]
    summary = f"targets met: {len(targeted) - len(missed)} of {len(targeted)}"
    return summary + ("" if not missed else f" (missed: {'; '.join(missed)})")


def main(argv: Sequence[str] | None = None) -> int:
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=names, help="run only this benchmark (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    args = parser.parse_args(argv)
    selected = [benchmark for benchmark in BENCHMARKS if not args.only or benchmark.name in args.only]
    outcomes = run_benchmarks(selected)
    if args.json:
        print(json.dumps([dataclasses.asdict(outcome) for outcome in outcomes], indent=2))
    else:
        print(format_report(outcomes))
    return 1 if any(outcome.error for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
