"""Run a Python module as n local ranks of MLX's ring backend, under a hard timeout.

What ``mlx.launch -n N`` does for local ranks, in-process and killable: a
hostfile (JSON, one ``["127.0.0.1:port"]`` per rank) and ``MLX_RANK`` /
``MLX_HOSTFILE`` in each rank's environment. A ring collective on CPU streams
can deadlock a few percent of the time (mlx#4475), so every launch has a
deadline: past it, every rank's process group is killed, and ``run_ranks``
retries the launch once and reports that it did (a warning). A second
timeout fails; nothing waits forever.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_RANKS = 2
WORKER_TIMEOUT_S = 90  # one launch: two ranks importing mlx_ext (and mlx-lm) on a loaded 2-core machine


class LaunchTimeout(RuntimeError):
    pass


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_ports(n: int) -> list[int]:
    """n ports the OS says are free now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch_once(argv: list[str], n: int, timeout: float, env: dict | None = None) -> list[RankResult]:
    """Starts `python argv...` as ranks 0..n-1 (cwd: the repository root);
    returns each rank's exit code and output, or raises LaunchTimeout after
    killing them all."""
    with tempfile.TemporaryDirectory(prefix="mlx_ext_ring_") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        procs, logs = [], []
        for rank in range(n):
            out, err = open(Path(tmp) / f"{rank}.out", "w+"), open(Path(tmp) / f"{rank}.err", "w+")
            logs.append((out, err))
            rank_env = {**os.environ, **(env or {}), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
                        "MLX_WORLD_SIZE": str(n)}
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env, stdout=out,
                                          stderr=err, start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for p in procs:  # each rank's own process group (start_new_session), by its id
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            raise LaunchTimeout(f"{' '.join(argv)}: {n} ranks ran past {timeout:.0f} s and were killed")
        results = []
        for rank, (p, (out, err)) in enumerate(zip(procs, logs)):
            out.seek(0), err.seek(0)
            results.append(RankResult(rank, p.returncode, out.read(), err.read()))
            out.close(), err.close()
        return results


def run_ranks(argv: list[str], n: int = 2, timeout: float = 60.0, env: dict | None = None) -> list[RankResult]:
    """launch_once, retried once after a timeout (with a warning saying so);
    raises LaunchTimeout after a second one."""
    try:
        return launch_once(argv, n, timeout, env)
    except LaunchTimeout as e:
        warnings.warn(f"{e}; retrying once (ring deadlock, mlx#4475?)", RuntimeWarning, stacklevel=2)
    return launch_once(argv, n, timeout, env)


def check_ranks(results: list[RankResult]) -> None:
    """Raises with every failed rank's output."""
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise AssertionError("\n".join(
            f"rank {r.rank} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
            for r in failed))


def launch_worker(scenario: str, out: Path) -> list[dict]:
    """Runs tests/distributed_worker.py's `scenario` on N_RANKS ranks writing
    to `out`; returns each rank's arrays, info and stdout."""
    import numpy as np

    results = run_ranks(["-m", "tests.distributed_worker", scenario, str(out)], N_RANKS, WORKER_TIMEOUT_S)
    check_ranks(results)
    return [
        {"arrays": dict(np.load(out / f"rank{r}.npz")), "info": json.loads((out / f"rank{r}.json").read_text()),
         "stdout": results[r].stdout}
        for r in range(N_RANKS)
    ]
