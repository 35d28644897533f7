"""Every benchmark of `bench/` at a size that fits a 2-core machine in a few minutes, in one table.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--json]

Each benchmark is the same code its own script runs (its `run()` function), only with smaller inputs; the
table has one row per figure: which benchmark, the figure, ours, the peer or limit measured in the same
run, the ratio, the target and whether it is met, then how many targets were met. Like every benchmark
here it is a report: exit code 1 only when a benchmark could not run, whatever the numbers say.
`bench/README.md` explains each figure and gives the full-size commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hub_load
import install
import provision
import sign_verify
from sign_verify import BenchError, Row


@dataclass(frozen=True)
class Benchmark:
    name: str
    size: str  # what "small" means for it, printed so the figures can be compared with bench/README.md
    run: Callable[[], list[Row]]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "sign_verify",
        "64 MiB image, best of 2",
        lambda: sign_verify.run(64, repeat=2),
    ),
    Benchmark(
        "provision",
        "115200 baud, 1 board then 8, best of 2",
        lambda: provision.run(baud=115200, boards=8, repeat=2),
    ),
    Benchmark(
        "hub_load",
        "100 agents (10 RSA_3072), 64 MiB blob, best of 2",
        lambda: hub_load.run(agents=100, rsa_agents=10, blob_mib=64, repeat=2),
    ),
    Benchmark(
        "install",
        "64 MiB image from the hub, best of 2",
        lambda: install.run(image_mib=64, repeat=2),
    ),
)


@dataclass(frozen=True)
class Outcome:
    benchmark: str
    seconds: float
    rows: list[Row]
    error: str = ""


def run_benchmarks(selected: Sequence[Benchmark]) -> list[Outcome]:
    outcomes = []
    for benchmark in selected:
        print(f"run_all: {benchmark.name} ({benchmark.size}) ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            rows, error = benchmark.run(), ""
        except BenchError as failure:
            rows, error = [], str(failure)
        outcomes.append(Outcome(benchmark.name, time.monotonic() - started, rows, error))
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
