"""``python -m disagg.supervise -- CMD...``: run CMD in its own process group, tied to our stdin.

The instance actor starts vLLM through this wrapper with a pipe as its stdin. When the actor
dies in any way (even SIGKILL from Ray), the pipe closes, and the wrapper stops the whole
vLLM process group (API server, engine core, workers): no orphaned engines. SIGTERM to the
wrapper does the same. If the wrapper itself is killed (Ray SIGKILLs a dead worker's
children), the kernel sends vLLM's API server SIGTERM (PR_SET_PDEATHSIG; this process's
main thread forked it and lives as long as the process), and vLLM stops its own engine.
Exit status is CMD's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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

    def watch_stdin() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set() and proc.poll() is None:
        stop.wait(0.5)
    _stop_group(proc)
    return proc.returncode if proc.returncode is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
