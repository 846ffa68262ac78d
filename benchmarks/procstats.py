"""CPU seconds and peak memory while a contender runs, read from /proc.

Two samplers, each a thread that samples every 50 ms until ``stop()``:

* ``TreeSampler`` — the contender's own process tree (the process and all its
  descendants): CPU is utime+stime of the live processes plus what their reaped
  children used (cutime/cstime), peak RSS is the largest sum of ``VmRSS`` seen, and
  ``VmHWM`` (the kernel's own exact high-water mark) of the root process is kept as well.
* ``ServerSampler`` — what the servers spend on the contender's behalf: utime+stime of
  the PostgreSQL walsenders (the postmaster's children whose process title says
  ``walsender``) and of nats-server, less what each process had used when sampling
  started (neither has children, so cutime/cstime add nothing there).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

__all__ = ["ServerSampler", "TreeSampler", "tree_pids", "walsender_pids"]

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


def walsender_pids(postmaster: int) -> list[int]:
    """The postmaster's walsenders (that exist right now).

    Only the postmaster's own children, so walsenders of other PostgreSQL servers on the
    machine do not count. A backend's command line is its process title, e.g.
    ``postgres: walsender bench 127.0.0.1(51234) START_REPLICATION``.
    """
    pids = []
    for pid in _children(postmaster):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and "walsender" in title:
            pids.append(pid)
    return pids


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


class _Sampler(ABC):
    """Calls ``sample()`` every `interval` seconds on a thread, from ``_start()`` to ``stop()``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @abstractmethod
    def sample(self) -> None:
        """Take one reading (each sampler says of what)."""

    def _start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """One last sample (the processes should still be alive), then stop sampling."""
        self.sample()
        self._stop.set()
        self._thread.join()


class TreeSampler(_Sampler):
    """Samples a process tree until ``stop()``; read ``cpu_s``, ``peak_rss_mib``."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.root = root
        self.cpu_s = 0.0
        self.peak_rss_kib = 0
        self.root_hwm_kib = 0
        self._seen_cpu: dict[int, float] = {}
        self._start()

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

    @property
    def peak_rss_mib(self) -> float:
        return max(self.peak_rss_kib, self.root_hwm_kib) / 1024


class ServerSampler(_Sampler):
    """Samples the servers until ``stop()``; read ``walsender_cpu_s``, ``nats_cpu_s``.

    `nats_server` None: the contender does not use it, ``nats_cpu_s`` stays None.
    A walsender's last moments before it exits (under `interval`) are not seen: it is
    gone from /proc then, and its CPU goes to the postmaster's cutime, which mixes in
    every other backend.
    """

    def __init__(self, postmaster: int, nats_server: int | None, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.postmaster = postmaster
        self.nats_server = nats_server
        self.walsender_cpu_s = 0.0
        self.nats_cpu_s: float | None = None if nats_server is None else 0.0
        # What a process had used before sampling started is not this contender's:
        # nats-server runs all along, and the previous contender's walsender may still
        # be on its way out. Walsenders are per connection, so usually new (from 0).
        self._before = {pid: _cpu_seconds(pid) for pid in walsender_pids(postmaster)}
        self._nats_before = _cpu_seconds(nats_server) if nats_server else 0.0
        self._seen_cpu: dict[int, float] = {}
        self._start()

    def sample(self) -> None:
        for pid in walsender_pids(self.postmaster):
            cpu = _cpu_seconds(pid)
            if cpu:
                self._seen_cpu[pid] = max(cpu, self._seen_cpu.get(pid, 0.0))
        self.walsender_cpu_s = sum(
            max(0.0, cpu - self._before.get(pid, 0.0)) for pid, cpu in self._seen_cpu.items()
        )
        if self.nats_server and self.nats_cpu_s is not None:
            cpu = _cpu_seconds(self.nats_server)
            if cpu:  # 0: gone (it should not be)
                self.nats_cpu_s = max(self.nats_cpu_s, cpu - self._nats_before)
