"""``python -m disagg.supervise -- CMD...``: run CMD in its own process group, tied to our stdin.

The instance actor starts vLLM through this wrapper with a pipe as its stdin. When the actor
dies in any way (even SIGKILL from Ray), the pipe closes, and the wrapper stops the whole
vLLM process group (API server, engine core, workers): no orphaned engines. SIGTERM to the
wrapper does the same. If the wrapper itself is killed (Ray SIGKILLs a dead worker's
children), the kernel sends vLLM's API server SIGTERM (PR_SET_PDEATHSIG; this process's
main thread forked it and lives as long as the process), and vLLM stops its own engine.
Exit status is CMD's (128 + N if signal N ended it, as a shell reports it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading

GRACE_S = 10.0


def _term_with_parent() -> None:
    """preexec: SIGTERM the child if this supervisor dies, even by SIGKILL (Ray kills a dead
    worker's child processes with SIGKILL; the engine must still shut down, not be orphaned)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # no straggler of the group stays
            os.killpg(proc.pid, signal.SIGKILL)
        return


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m disagg.supervise -- CMD...", file=sys.stderr)
        return 2
    # Ray runs actors at a raised niceness (RAY_worker_niceness, 15 by default); an engine
    # must not inherit it or it loses the CPU to anything else on the node.
    with contextlib.suppress(PermissionError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    # Confine the whole engine (API server, engine core, workers) to the instance's cores, not
    # only its OpenMP threads: otherwise a busy-polling engine core or API server of one
    # instance steals cycles from another instance's forward passes.
    cores = os.environ.get("DISAGG_CPU_AFFINITY")
    if cores:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
    proc = subprocess.Popen(argv[1:], start_new_session=True, stdin=subprocess.DEVNULL,
                            preexec_fn=_term_with_parent)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # stdin is watched here, on the raw descriptor, not by a reader thread: a daemon thread
    # blocked in ``sys.stdin.buffer.read`` holds the buffer's lock, and the interpreter's
    # shutdown then aborts ("Fatal Python error: _enter_buffered_busy ... <stdin>").
    while not stop.is_set() and proc.poll() is None and _stdin_open(0.5):
        pass
    _stop_group(proc)
    if proc.returncode is None:
        return 1
    return 128 - proc.returncode if proc.returncode < 0 else proc.returncode  # as a shell


def _stdin_open(timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for stdin; False once it is closed (EOF or an error)."""
    fd = sys.stdin.fileno()
    if not select.select([fd], [], [], timeout_s)[0]:
        return True
    try:
        return bool(os.read(fd, 4096))
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
