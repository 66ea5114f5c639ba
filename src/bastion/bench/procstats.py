"""CPU time and peak memory of a process tree, from /proc (Linux only).

A server under test is a tree (supervisor, workers, inference pools), so everything is
summed over a root pid and its descendants, found anew at each reading because workers
come and go. CPU is utime + stime + cutime + cstime of each member: when a member exits,
the kernel moves its time into its parent's ``cutime``/``cstime`` once reaped, so the
tree's sum does not drop. (A member reaped by a process *outside* the tree takes its time
with it; servers reap their own workers.)

Peak RSS is reported two ways, because neither alone is right:

* ``peak_rss_mib``: the largest *sum of current RSS* (``VmRSS``) over the tree seen by a
  sampling thread. The tree's real simultaneous footprint, but a spike shorter than the
  sampling interval can be missed.
* ``hwm_sum_mib``: the sum of each member's own high-water mark (``VmHWM``), as last
  seen (members that exited during the span included).
  Never misses a spike, but adds peaks that may not have happened at the same time, and
  counts shared pages once per process: an upper bound.

:class:`HostMonitor` adds the whole machine's CPU (``/proc/stat``) and the CPU of the
children reaped over a span (the load generator), so that other load on the machine, and
the generator's own share of the cores, show next to a server's figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import threading
import time
from dataclasses import dataclass
from types import TracebackType

PROC = "/proc"
_VM = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` used here (times in clock ticks)."""

    pid: int
    comm: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        return self.utime + self.stime + self.cutime + self.cstime


def parse_proc_stat(line: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line (proc(5)).

    ``comm`` is in parentheses and may itself hold spaces and parentheses, so split at the
    *last* ``)``; the fields after it are numbered from 3 (state).
    """
    open_paren, close_paren = line.index("("), line.rindex(")")
    rest = line[close_paren + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3]
    return ProcStat(
        pid=int(line[:open_paren]),
        comm=line[open_paren + 1 : close_paren],
        ppid=int(rest[1]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
    )


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None  # gone between listing /proc and reading it


def process_tree(root: int, proc: str = PROC) -> dict[int, ProcStat]:
    """``root`` and all its descendants, by pid; empty if ``root`` is gone."""
    stats: dict[int, ProcStat] = {}
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if entry.isdigit() and (text := _read(f"{proc}/{entry}/stat")):
            with contextlib.suppress(ValueError, IndexError):
                s = parse_proc_stat(text)
                stats[s.pid] = s
                children.setdefault(s.ppid, []).append(s.pid)
    tree: dict[int, ProcStat] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid]
            frontier.extend(children.get(pid, ()))
    return tree


def find_child(parent: int, *words: bytes, timeout_s: float = 30.0, proc: str = PROC) -> int:
    """The pid of a child of ``parent`` whose command line holds every one of ``words`` (e.g. the
    trusted worker a front supervises: ``b"worker", b"serve"``), waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, stat in process_tree(parent, proc).items():
            if stat.ppid != parent:
                continue
            cmdline = (_read(f"{proc}/{pid}/cmdline") or "").encode().split(b"\0")
            if all(w in cmdline for w in words):
                return pid
        time.sleep(0.05)
    raise RuntimeError(f"no child of pid {parent} running {b' '.join(words).decode()}")


def tree_cpu_seconds(tree: dict[int, ProcStat], clock_ticks: int | None = None) -> float:
    return sum(s.ticks for s in tree.values()) / (clock_ticks or os.sysconf("SC_CLK_TCK"))


def memory_kib(pid: int, proc: str = PROC) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB; (0, 0) for a kernel thread or a gone process."""
    found = dict(_VM.findall(_read(f"{proc}/{pid}/status") or ""))
    return int(found.get("VmRSS", 0)), int(found.get("VmHWM", 0))


@dataclass(frozen=True)
class TreeUsage:
    cpu_s: float  # CPU seconds of the tree between start and stop
    wall_s: float
    peak_rss_mib: float  # largest sampled sum of VmRSS
    hwm_sum_mib: float  # sum of VmHWM at the end (an upper bound, see the module docstring)
    max_processes: int
    samples: int
    root_exited: bool = False  # cpu_s is then a lower bound (see TreeMonitor.stop)

    @property
    def cores(self) -> float:
        """Average cores busy."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "cores": self.cores,
            "peak_rss_mib": self.peak_rss_mib,
            "hwm_sum_mib": self.hwm_sum_mib,
            "max_processes": self.max_processes,
            "samples": self.samples,
            "root_exited": self.root_exited,
        }


class TreeMonitor:
    """Measure a process tree over a span: ``with TreeMonitor(pid) as m: ...; m.usage``.

    A daemon thread samples the tree's RSS every ``interval_s``. Listing /proc costs
    ~1 ms per few hundred processes, so 50 ms keeps the sampler's own CPU negligible
    next to the server it measures.
    """

    def __init__(self, pid: int, interval_s: float = 0.05, proc: str = PROC) -> None:
        self.pid, self.interval_s, self.proc = pid, interval_s, proc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0 = 0.0
        self._t0 = 0.0
        self._peak_kib = 0
        self._hwm_kib: dict[int, int] = {}  # last VmHWM seen per pid, so exited workers still count
        self._max_procs = 0
        self._samples = 0
        self._last_cpu = 0.0
        self.usage: TreeUsage | None = None

    def _sample(self) -> dict[int, ProcStat]:
        tree = process_tree(self.pid, self.proc)
        rss = 0
        for pid in tree:
            cur, hwm = memory_kib(pid, self.proc)
            rss += cur
            if hwm:
                self._hwm_kib[pid] = hwm
        self._peak_kib = max(self._peak_kib, rss)
        self._max_procs = max(self._max_procs, len(tree))
        self._samples += 1
        if tree:
            self._last_cpu = tree_cpu_seconds(tree)
        return tree

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def samples(self) -> int:
        """Samples taken so far (a caller can wait for the sampler to have seen a state)."""
        return self._samples

    def start(self) -> TreeMonitor:
        tree = self._sample()
        if not tree:
            raise ProcessLookupError(f"no process {self.pid}")
        self._cpu0 = tree_cpu_seconds(tree)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"tree-monitor-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TreeUsage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = time.monotonic() - self._t0
        tree = self._sample()
        # A root that exited and was reaped leaves no /proc entry: fall back to the last
        # sample, a lower bound short by at most one interval of CPU.
        self.usage = TreeUsage(
            cpu_s=self._last_cpu - self._cpu0,
            root_exited=not tree,
            wall_s=wall,
            peak_rss_mib=self._peak_kib / 1024,
            hwm_sum_mib=sum(self._hwm_kib.values()) / 1024,
            max_processes=self._max_procs,
            samples=self._samples,
        )
        return self.usage

    def __enter__(self) -> TreeMonitor:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class MachineCpu:
    """The first line of ``/proc/stat``: busy and steal time over all cores, in clock ticks."""

    busy: int
    total: int
    steal: int

    @classmethod
    def parse(cls, line: str) -> MachineCpu:
        values = [int(v) for v in line.split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
        # already counted in user, so only the first eight add up to the total.
        user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq
        return cls(busy=busy, total=busy + idle + iowait + steal, steal=steal)

    @classmethod
    def read(cls, proc: str = PROC) -> MachineCpu:
        with open(f"{proc}/stat", encoding="ascii") as f:
            return cls.parse(f.readline())


@dataclass(frozen=True)
class HostUsage:
    machine_busy_s: float  # every core, every process: what else ran shows as the excess
    machine_steal_s: float  # taken by the hypervisor
    children_cpu_s: float  # CPU of this process's children reaped during the span (a load generator)
    wall_s: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class HostMonitor:
    """The whole machine's CPU and the CPU of children reaped over a span:
    ``with HostMonitor() as h: subprocess.run(wrk...); h.usage``.

    A server under test is a child too, but it is still running (not reaped) when the span
    ends, so when the load generator is the only child that exits inside the span,
    ``children_cpu_s`` is the generator's own CPU.
    """

    def __init__(self, proc: str = PROC) -> None:
        self.proc = proc
        self.usage: HostUsage | None = None
        self._machine = MachineCpu(0, 0, 0)
        self._children = 0.0
        self._t0 = 0.0

    @staticmethod
    def _children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __enter__(self) -> HostMonitor:
        self._machine = MachineCpu.read(self.proc)
        self._children = self._children_cpu()
        self._t0 = time.monotonic()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        after = MachineCpu.read(self.proc)
        ticks = os.sysconf("SC_CLK_TCK")
        self.usage = HostUsage(
            machine_busy_s=(after.busy - self._machine.busy) / ticks,
            machine_steal_s=(after.steal - self._machine.steal) / ticks,
            children_cpu_s=self._children_cpu() - self._children,
            wall_s=time.monotonic() - self._t0,
        )


def busy_cores(seconds: float = 1.0, proc: str = PROC) -> float:
    """Cores busy on the whole machine over ``seconds`` of this process sleeping: what a
    benchmark about to start would be sharing the CPU with."""
    with HostMonitor(proc) as host:
        time.sleep(seconds)
    assert host.usage is not None
    return host.usage.machine_busy_s / host.usage.wall_s
