"""kdlm.memory: a process's peak RSS is its own, not its parent's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdlm.memory import current_rss_mb, peak_rss_mb

CHILD = "import resource; from kdlm.memory import peak_rss_mb; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_rss_mb())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the carried-over ru_maxrss are Linux's")
def test_a_child_of_a_large_parent_reports_its_own_peak():
    ballast = bytearray(600 * 2**20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touch every page: 600 MiB resident in this process
    ru_maxrss, own = map(float, subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert ru_maxrss > 600  # what Linux carries over exec: the parent's peak
    assert own < 200  # a bare Python with kdlm.memory imported
    del ballast


def test_peak_is_at_least_the_current_size():
    assert peak_rss_mb() >= current_rss_mb() > 0
