"""Where the test suite's CPU time goes: a pytest plugin that records, for every test, the CPU
seconds of the test process and of the child processes it waited for (CLI runs, scripts, servers
stopped inside the test), beside its wall seconds; and a summary of those records.

    SUITE_PROFILE_DIR=/tmp/prof .venv/bin/python -m pytest -p bench.suite_profile -q -n 2 \\
        --dist loadfile --no-loadscope-reorder
    .venv/bin/python -m bench.suite_profile /tmp/prof --top 30

CPU of a process that outlives its test (a shared server, a pool's workers) is counted in the
test during which it is reaped, or not at all: the per-file sums are close, single tests may not
be. Each xdist worker writes its own ``<pid>.jsonl``."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

OUT_VAR = "SUITE_PROFILE_DIR"


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get(OUT_VAR):
        raise pytest.UsageError(f"bench.suite_profile: set {OUT_VAR} to the folder the records go to")


def _cpu_seconds() -> float:
    """User + system seconds of this process and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    yield
    record = {"id": item.nodeid, "cpu": _cpu_seconds() - cpu0, "wall": time.monotonic() - wall0}
    out = Path(os.environ[OUT_VAR])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(directory: Path) -> list[dict]:
    """Every test's record: {"id", "cpu", "wall"}."""
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


def by_file(records: list[dict]) -> list[tuple[str, float, float]]:
    """(file, CPU seconds, wall seconds), most CPU first."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        name = r["id"].split("::")[0]
        sums[name][0] += r["cpu"]
        sums[name][1] += r["wall"]
    return sorted(((name, cpu, wall) for name, (cpu, wall) in sums.items()), key=lambda row: -row[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    records = read_records(args.directory)
    print(f"{len(records)} tests: {sum(r['cpu'] for r in records):.0f} CPU s, {sum(r['wall'] for r in records):.0f} wall s")
    print("\n| file | CPU s | wall s |\n|---|---|---|")
    for name, cpu, wall in by_file(records)[: args.top]:
        print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
    print("\n| test | CPU s | wall s |\n|---|---|---|")
    for r in sorted(records, key=lambda r: -r["cpu"])[: args.top]:
        print(f"| {r['id']} | {r['cpu']:.1f} | {r['wall']:.1f} |")


if __name__ == "__main__":
    main()
