"""The machine a benchmark ran on, and CPU accounting from /proc (Linux)."""

from __future__ import annotations

import os
import platform
import sqlite3
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def describe(packages: tuple[str, ...]) -> list[str]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    return [
        f"machine: nproc {cores()} ({os.cpu_count()} cores), {model}, Linux {platform.release()}",
        f"Python {platform.python_version()} ({platform.python_implementation()}); {versions}; "
        f"SQLite {sqlite3.sqlite_version}",
    ]


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """Cumulative jiffies from the "cpu" line of /proc/stat."""

    user: int
    system: int
    idle: int
    iowait: int
    steal: int
    total: int

    @classmethod
    def read(cls) -> MachineCpu:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, idle, iowait = values[:5]
        steal = values[7] if len(values) > 7 else 0
        return cls(user + nice, system + sum(values[5:7]), idle, iowait, steal, sum(values[:8]))

    def busy_cores_since(self, before: MachineCpu) -> float:
        """Cores busy on average between ``before`` and this reading (iowait and steal count as idle)."""
        jiffies = self.total - before.total or 1
        idle = self.idle - before.idle + self.iowait - before.iowait + self.steal - before.steal
        return (1 - idle / jiffies) * cores()

    def shares_since(self, before: MachineCpu) -> str:
        jiffies = self.total - before.total or 1
        user = (self.user - before.user) / jiffies
        system = (self.system - before.system) / jiffies
        iowait = (self.iowait - before.iowait) / jiffies
        steal = (self.steal - before.steal) / jiffies
        return f"user {user:.0%}, system {system:.0%}, iowait {iowait:.0%}, steal {steal:.0%}"

    def steal_since(self, before: MachineCpu) -> float:
        """Share of CPU time the hypervisor gave to someone else."""
        return (self.steal - before.steal) / (self.total - before.total or 1)


def process_cpu(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state); utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def background_load(seconds: float = 1.0) -> str:
    """How busy the machine is without us: other work skews every number a benchmark prints."""
    before, own0 = MachineCpu.read(), time.process_time()
    time.sleep(seconds)
    busy = MachineCpu.read().busy_cores_since(before) - (time.process_time() - own0) / seconds
    load1, load5, _ = os.getloadavg()
    note = "quiet" if busy < 0.15 else "BUSY: other processes compete for the CPU; numbers will be low and noisy"
    busy_text = f"{max(0.0, busy):.2f} of {cores()} cores busy before the run"
    return f"background: {busy_text} (loadavg {load1:.2f} {load5:.2f}), {note}"
