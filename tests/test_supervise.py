"""``python -m disagg.supervise``: exits with its child's status, stops the child's process
group when stdin closes, and leaves the interpreter cleanly (no fatal error at shutdown)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

SUPERVISE = [sys.executable, "-m", "disagg.supervise", "--"]


def test_child_exit_status_and_clean_shutdown():
    """An engine that dies by itself (a start-up failure) while the actor still holds our
    stdin open: the supervisor exits with its status, and its interpreter shuts down cleanly
    (a reader thread blocked on stdin made it abort: "Fatal Python error:
    _enter_buffered_busy ... <stdin>", status 134)."""
    proc = subprocess.Popen([*SUPERVISE, sys.executable, "-c", "import sys; sys.exit(4)"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(60) == 4  # stdin still open: the child's exit alone ends it
        assert b"Fatal Python error" not in proc.stderr.read()
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()


def test_stdin_closed_stops_the_group():
    proc = subprocess.Popen(
        [*SUPERVISE, "bash", "-c", "sleep 300 & sleep 300; wait"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(proc.pid).children(recursive=True)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.stdin.close()  # the actor died
        proc.wait(30)
        assert b"Fatal Python error" not in proc.stderr.read()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_child_killed_by_a_signal_exits_as_a_shell_reports_it():
    proc = subprocess.Popen([*SUPERVISE, sys.executable, "-c",
                             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(60) == 128 + 9
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
