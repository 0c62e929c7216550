"""Where a command's CPU time goes, process by process: samples every process's own CPU time
(``/proc/PID/stat``, user + system) twice a second while the command runs, then sums it by kind
of process (the test processes, the command forker and its children, Prefect servers, `gpuclust`
subprocesses, multiprocessing children, Chromium, ...).

    .venv/bin/python -m bench.process_cpu --out /tmp/procs.json -- \\
        .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
    .venv/bin/python -m bench.process_cpu --summary /tmp/procs.json

Linux only. A process that lives less than half a second between two samples is missed (the
summary prints the machine's busy CPU time beside the sampled sum); a process's CPU time before
the command started is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

#: Clock ticks per second of /proc's CPU times.
TICKS = os.sysconf("SC_CLK_TCK")

#: (substring of the command line, kind), the first that matches names a process's kind.
KINDS = (
    ("forked_cli.py", "command forker and its forked commands"),
    ("prefect server start", "Prefect server"),
    ("prefect.server.api.server:create_app", "Prefect server"),
    ("exec(eval(sys.stdin.readline()))", "pytest-xdist worker"),
    ("multiprocessing", "multiprocessing child (loader or Dask worker)"),
    ("bin/gpuclust", "gpuclust subprocess"),
    ("bin/prefect", "prefect CLI or worker"),
    ("prefect.runner", "prefect CLI or worker"),
    ("pip install", "pip"),
    ("chrom", "Chromium"),
    ("pytest", "pytest controller"),
)


def machine_busy_ticks() -> int:
    """CPU ticks the machine has spent busy (not idle, not waiting on I/O) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def sample(seen: dict[str, list], skip: int) -> None:
    """Record every process's own CPU ticks in ``seen`` (key ``pid:start``: [ticks, command line])."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == skip:
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            rest = stat[stat.rindex(")") + 2:].split()
            ticks, start = int(rest[11]) + int(rest[12]), rest[19]
            key = f"{name}:{start}"
            if key in seen:
                seen[key][0] = ticks
            else:
                cmdline = Path(f"/proc/{name}/cmdline").read_text().replace("\0", " ").strip()
                seen[key] = [ticks, cmdline[:300]]
        except (OSError, ValueError, IndexError):
            continue


def record(command: list[str], out: Path, interval_s: float = 0.5) -> int:
    """Run ``command``, sampling every process until it ends; write the samples to ``out``."""
    before: dict[str, list] = {}
    sample(before, os.getpid())
    busy0 = machine_busy_ticks()
    proc = subprocess.Popen(command)
    seen: dict[str, list] = {}
    while proc.poll() is None:
        sample(seen, os.getpid())
        time.sleep(interval_s)
    sample(seen, os.getpid())
    busy = machine_busy_ticks() - busy0
    for key, (ticks, _) in seen.items():
        if key in before:  # started before the command: only what it spent since
            seen[key][0] = ticks - before[key][0]
    out.write_text(json.dumps({"busy_ticks": busy, "processes": seen}))
    return proc.returncode


def kind_of(cmdline: str) -> str:
    for needle, kind in KINDS:
        if needle in cmdline:
            return kind
    return "other: " + (cmdline.split(" ")[0].rsplit("/", 1)[-1] or "?")


def summary(path: Path, top: int = 20) -> str:
    """CPU seconds by kind of process, largest first, as a Markdown table."""
    data = json.loads(path.read_text())
    seconds: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for ticks, cmdline in data["processes"].values():
        if ticks > 0:
            seconds[kind_of(cmdline)] += ticks / TICKS
            count[kind_of(cmdline)] += 1
    lines = [f"machine busy {data['busy_ticks'] / TICKS:.0f} CPU-s; sampled {sum(seconds.values()):.0f} CPU-s", "",
             "| processes | count | CPU s |", "|---|---|---|"]
    lines += [f"| {kind} | {count[kind]} | {s:.1f} |" for kind, s in seconds.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the samples go (with a command after --)")
    parser.add_argument("--summary", type=Path, help="print the summary of these samples")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.out or not command:
        parser.error("give --out FILE -- COMMAND..., or --summary FILE")
    sys.exit(record(command, args.out))


if __name__ == "__main__":
    main()
