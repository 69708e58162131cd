"""`lite-ft run RECIPE --nproc N`: start N processes of the same command on this machine, as torchrun would, and
watch them. When one fails, the others are stopped at once (SIGTERM, then SIGKILL after a grace period) and the
failing rank's own message is shown, not the others' reactions to losing it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_S = 20.0  # SIGTERM lets a rank finish its step and checkpoint; past this it is killed
POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], nproc: int) -> int:
    """Run `python -m lite_ft *args` as ranks 0..nproc-1 on 127.0.0.1; return the job's exit code (the first
    failing rank's, else 0). Rank 0's output is shown as it comes; the other ranks' is kept in files and shown
    when they fail."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)  # N processes sharing the cores must not oversubscribe them
    logs = Path(tempfile.mkdtemp(prefix="lite-ft-ranks-"))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        out = None if rank == 0 else open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "lite_ft", *args], env=env, stdout=out,
                                      stderr=subprocess.STDOUT if out else None, preexec_fn=_die_with_launcher))
    previous = {sig: signal.signal(sig, lambda signum, frame: _forward(procs, signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _watch(procs, logs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_launcher() -> None:
    """Linux: a rank gets SIGTERM when the launcher dies, however it dies (even SIGKILL), instead of waiting for
    the others in a collective until the timeout."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _forward(procs: list[subprocess.Popen], signum: int) -> None:
    """Ctrl-C or SIGTERM to the launcher goes to every rank: they agree on the step to stop after."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)


def _watch(procs: list[subprocess.Popen], logs: Path) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            _stop(procs)
            print(_failure(rank, code, logs), file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code  # a signal -N reads as 128 + N, as shells report it
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen]) -> None:
    _forward(procs, signal.SIGTERM)
    deadline = time.time() + GRACE_S
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(POLL_S)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _failure(rank: int, code: int, logs: Path) -> str:
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    lines = []
    log = logs / f"rank{rank}.log"
    if log.is_file():
        text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        lines = [line for line in text if line.startswith("error:")] or text[-3:]
    said = ("\n" + "\n".join(lines)) if lines else ""
    return (f"lite-ft: rank {rank} {how}; the other ranks were stopped.{said}\n"
            "Run the same command again to resume from the last checkpoint.")
