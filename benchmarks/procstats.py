"""CPU seconds and peak memory of a contender's process tree, read from /proc.

A sampler thread walks the tree (the process and all its descendants) every 50 ms:
CPU is utime+stime of the live processes plus what their reaped children used
(cutime/cstime), peak RSS is the largest sum of ``VmRSS`` seen, and ``VmHWM`` (the
kernel's own exact high-water mark) of the root process is kept as well.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["TreeSampler", "tree_pids"]

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants (that exist right now)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += _children(pid)
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    # utime, stime, cutime, cstime are fields 14..17 (1-based), here 11..14 after state.
    return sum(int(f) for f in fields[11:15]) / _TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler:
    """Samples a process tree until ``stop()``; read ``cpu_s``, ``peak_rss_mib``."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.cpu_s = 0.0
        self.peak_rss_kib = 0
        self.root_hwm_kib = 0
        self._seen_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        pids = tree_pids(self.root)
        rss = 0
        for pid in pids:
            cpu = _cpu_seconds(pid)
            if cpu:
                self._seen_cpu[pid] = max(cpu, self._seen_cpu.get(pid, 0.0))
            rss += _status_kib(pid, "VmRSS:")
        self.cpu_s = sum(self._seen_cpu.values())
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.root_hwm_kib = max(self.root_hwm_kib, _status_kib(self.root, "VmHWM:"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """One last sample (the process should still be alive), then stop sampling."""
        self.sample()
        self._stop.set()
        self._thread.join()

    @property
    def peak_rss_mib(self) -> float:
        return max(self.peak_rss_kib, self.root_hwm_kib) / 1024
