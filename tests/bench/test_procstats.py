"""bastion.bench.procstats on this test process, a child tree and a fake /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.bench.procstats import (
    HostMonitor,
    MachineCpu,
    TreeMonitor,
    busy_cores,
    memory_kib,
    parse_proc_stat,
    process_tree,
    tree_cpu_seconds,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def _until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` (a loaded machine is slow,
    not wrong, so no fixed sleep decides the outcome)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached after {timeout_s:.0f} s")
        time.sleep(0.01)


def _stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    # the 52 fields of proc(5), as Linux 6.x writes them; the ones not used are plausible filler
    fields = ["S", ppid, pid, pid, 0, -1, 4194560, 3000, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 3, 0]
    fields += [123456, 612000000, 20000] + [0] * 30
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields[:50]) + "\n"


def test_parse_proc_stat_with_awkward_comm() -> None:
    line = "4242 (we ird) (name)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 123 4096 300"
    s = parse_proc_stat(line)
    assert (s.pid, s.comm, s.ppid) == (4242, "we ird) (name)", 17)
    assert (s.utime, s.stime, s.cutime, s.cstime) == (250, 50, 7, 3)
    assert s.ticks == 310
    assert tree_cpu_seconds({s.pid: s}, clock_ticks=100) == pytest.approx(3.10)
    full = parse_proc_stat(_stat_line(4242, "py (worker) 1", 4000, utime=150, stime=30, cutime=7, cstime=3))
    assert (full.comm, full.ppid, full.ticks) == ("py (worker) 1", 4000, 190)


def test_parse_proc_stat_real_line() -> None:
    with open("/proc/self/stat", encoding="ascii") as f:
        s = parse_proc_stat(f.read())
    assert s.pid == os.getpid() and s.ppid == os.getppid()


def test_self_is_in_its_own_tree() -> None:
    tree = process_tree(os.getpid())
    assert os.getpid() in tree
    rss, hwm = memory_kib(os.getpid())
    assert 0 < rss <= hwm
    assert process_tree(2**22 + 12345) == {}  # beyond pid_max: never a process


def _fake_proc(root: Path, procs: list[tuple[int, int, int, int, int, int]]) -> None:
    for pid, ppid, utime, stime, rss_kib, hwm_kib in procs:
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text(_stat_line(pid, f"p{pid}", ppid, utime, stime))
        (d / "status").write_text(f"Name:\tp{pid}\nVmHWM:\t  {hwm_kib} kB\nVmRSS:\t  {rss_kib} kB\n")
    (root / "self").mkdir()  # non-numeric entries are skipped
    (root / "stat").write_text("cpu  23737 0 3575 104090 540 0 470 11 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")


def test_process_tree_cpu_and_memory_on_a_fake_proc(tmp_path: Path) -> None:
    # supervisor 100 -> workers 101, 102 -> 103 (a worker's child); 200 is someone else's
    _fake_proc(tmp_path, [(100, 1, 50, 10, 512, 1024), (101, 100, 300, 100, 1024, 2048),
                          (102, 100, 200, 40, 1024, 2048), (103, 101, 5, 5, 512, 512),
                          (200, 1, 9999, 9999, 99999, 99999)])  # fmt: skip
    tree = process_tree(100, proc=str(tmp_path))
    assert sorted(tree) == [100, 101, 102, 103]
    assert tree_cpu_seconds(tree, clock_ticks=100) == pytest.approx((60 + 400 + 240 + 10) / 100)
    assert memory_kib(101, proc=str(tmp_path)) == (1024, 2048)
    assert process_tree(999, proc=str(tmp_path)) == {}
    with TreeMonitor(100, interval_s=60, proc=str(tmp_path)) as mon:
        pass
    usage = mon.usage
    assert usage is not None
    assert usage.peak_rss_mib == pytest.approx((512 + 1024 + 1024 + 512) / 1024)  # the sum of VmRSS
    assert usage.hwm_sum_mib == pytest.approx((1024 + 2048 + 2048 + 512) / 1024)  # the sum of each VmHWM
    assert usage.max_processes == 4 and usage.cpu_s == 0.0


def test_reaped_worker_moves_into_parent_cutime() -> None:
    # Before: worker alive with 400 ticks. After: it exited and the supervisor reaped it.
    before = {100: parse_proc_stat(_stat_line(100, "sup", 1, 60, 0)),
              101: parse_proc_stat(_stat_line(101, "w", 100, 400, 0))}  # fmt: skip
    after = {100: parse_proc_stat(_stat_line(100, "sup", 1, 70, 0, cutime=450))}
    assert tree_cpu_seconds(after, 100) - tree_cpu_seconds(before, 100) == pytest.approx(0.6)


def test_machine_cpu() -> None:
    m = MachineCpu.parse("cpu  23737 0 3575 104090 540 0 470 11 0 0")
    assert m.busy == 23737 + 3575 + 470
    assert m.steal == 11
    assert m.total == m.busy + 104090 + 540 + 11
    real = MachineCpu.read()
    assert 0 < real.busy <= real.total


# The child starts a grandchild that holds 80 MiB, burns 0.4 s of CPU itself, and then each
# waits for its stdin to close: the test decides when the tree ends, not a timer.
CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import sys; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "print('ready', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert grandchild.stdout.readline() == b"ready\\n"
    end = time.process_time() + 0.4
    while time.process_time() < end:  # burn CPU in the child itself
        pass
    print("burnt", flush=True)
    sys.stdin.read()
    grandchild.stdin.close()
    grandchild.wait()
    """
)


def test_monitor_sees_a_child_tree_cpu_and_memory() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        with TreeMonitor(child.pid, interval_s=0.02) as mon:
            assert child.stdout.readline() == b"burnt\n"  # the grandchild holds its 80 MiB now
            assert len(process_tree(child.pid)) == 2  # child + grandchild, found by ppid
            seen = mon.samples
            _until(lambda: mon.samples >= seen + 3, what="three samples of the whole tree")
            child.stdin.close()
            child.wait(30)
    finally:
        child.kill()
        child.wait()
    usage = mon.usage
    assert usage is not None
    # the child exited and was reaped: CPU is the last sample's, a lower bound
    assert usage.root_exited
    assert 0.35 <= usage.cpu_s <= 2.0  # it burnt 0.4 s, plus two interpreter start-ups
    # the peak RSS was sampled while both lived: the grandchild's 80 MiB is in it
    assert usage.peak_rss_mib >= 80
    assert usage.hwm_sum_mib >= usage.peak_rss_mib * 0.9
    assert usage.max_processes == 2
    assert usage.samples >= 5


def test_monitor_on_self_counts_a_reaped_childs_cpu() -> None:
    # The test process is the root: a child reaped here moves its CPU into our cutime.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    with TreeMonitor(os.getpid(), interval_s=0.02) as mon:
        subprocess.run([sys.executable, "-c", burn], check=True)
    usage = mon.usage
    assert usage is not None
    assert usage.cpu_s >= 0.25
    assert usage.wall_s >= 0.25
    assert 0 < usage.cores <= (os.cpu_count() or 1) + 0.5
    assert usage.to_dict()["cpu_s"] == usage.cpu_s


def test_host_monitor_counts_the_reaped_child_and_the_machine() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    with HostMonitor() as host:
        subprocess.run([sys.executable, "-c", burn], check=True)
    usage = host.usage
    assert usage is not None
    assert 0.25 <= usage.children_cpu_s <= 2.0  # the child alone: 0.3 s and an interpreter start
    assert usage.machine_busy_s >= 0.2  # the same burn, seen by the whole machine
    assert usage.machine_steal_s >= 0 and usage.wall_s >= 0.25
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 0.5


def test_monitor_on_a_missing_process() -> None:
    with pytest.raises(ProcessLookupError):
        TreeMonitor(2**22 + 12345).start()
