"""bastion.bench.procstats on this test process and a child tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from bastion.bench.procstats import (
    TreeMonitor,
    memory_kib,
    parse_proc_stat,
    process_tree,
    tree_cpu_seconds,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def test_parse_proc_stat_with_awkward_comm() -> None:
    line = "4242 (we ird) (name)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 123 4096 300"
    s = parse_proc_stat(line)
    assert (s.pid, s.comm, s.ppid) == (4242, "we ird) (name)", 17)
    assert (s.utime, s.stime, s.cutime, s.cstime) == (250, 50, 7, 3)
    assert s.ticks == 310
    assert tree_cpu_seconds({s.pid: s}, clock_ticks=100) == pytest.approx(3.10)


def test_self_is_in_its_own_tree() -> None:
    tree = process_tree(os.getpid())
    assert os.getpid() in tree
    rss, hwm = memory_kib(os.getpid())
    assert 0 < rss <= hwm
    assert process_tree(2**22 + 12345) == {}  # beyond pid_max: never a process


CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"])
    end = time.process_time() + 0.4
    while time.process_time() < end:  # burn CPU in the child itself
        pass
    grandchild.wait()
    """
)


def test_monitor_sees_a_child_tree_cpu_and_memory() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        time.sleep(0.05)
        with TreeMonitor(child.pid, interval_s=0.02) as mon:
            tree_seen = len(process_tree(child.pid))
            time.sleep(0.3)
            assert len(process_tree(child.pid)) == 2  # child + grandchild, found by ppid
            child.wait(10)
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    usage = mon.usage
    assert usage is not None
    assert tree_seen >= 1
    # the child exited and was reaped: CPU is the last sample's, a lower bound
    assert usage.root_exited
    assert 0.2 <= usage.cpu_s <= 1.5  # it burnt 0.4 s, plus two interpreter start-ups
    # the peak RSS was sampled while it lived: the grandchild's 80 MiB is in it
    assert usage.peak_rss_mib >= 80
    assert usage.hwm_sum_mib >= usage.peak_rss_mib * 0.9
    assert usage.max_processes == 2
    assert usage.samples >= 5


def test_monitor_on_self_counts_a_reaped_childs_cpu() -> None:
    # The test process is the root: a child reaped here moves its CPU into our cutime.
    with TreeMonitor(os.getpid(), interval_s=0.02) as mon:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass",
            ],
            check=True,
        )
    usage = mon.usage
    assert usage is not None
    assert usage.cpu_s >= 0.25
    assert usage.wall_s >= 0.25
    assert 0 < usage.cores <= (os.cpu_count() or 1) + 0.5
    assert usage.to_dict()["cpu_s"] == usage.cpu_s


def test_monitor_on_a_missing_process() -> None:
    with pytest.raises(ProcessLookupError):
        TreeMonitor(2**22 + 12345).start()
