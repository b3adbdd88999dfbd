"""The project's commands (``python -m monai.bundle ...``, ``python -m liver_fcn.cli ...``) run as a
user types them, either in a new interpreter or forked from a warm one.

Most of a short command's time is the import of MONAI (7-8 s on two cores: it loads torch, ignite,
mlflow and scipy whatever the command). ``warm_module`` runs the same module as ``python -m`` does,
with the same arguments, working folder and environment, in a child forked from a multiprocessing
forkserver that imported ``monai.bundle`` and the package once (not the modules it runs). The child takes its own stdout
and stderr (at the file-descriptor level, so the bundle's logging and warnings land there too), and
ends as the interpreter would: exit code from ``SystemExit``, a traceback and exit 1 for any other
exception, ``atexit`` handlers run (MLflow ends its active run there). The forkserver itself never runs
a tensor operation, so no OpenMP thread pool is forked. ``test_bundle.py`` checks that both ways give
the same exit code and the same lines.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: modules the forkserver imports once, before any child is forked from it
PRELOAD = ["monai.bundle", "liver_fcn.crossval", "liver_fcn.inference", "liver_fcn.tracking"]

_context = None


def new_process(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """``python -m module args...`` in a new interpreter."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child(module: str, args: list[str], cwd: str, env: dict, stdout: str, stderr: str) -> None:
    """Runs in the forked child: ``python -m module args`` on the given streams, then exits."""
    code = 0
    try:
        out, err = os.open(stdout, os.O_WRONLY), os.open(stderr, os.O_WRONLY)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the streams live until os._exit
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if env.get("OMP_NUM_THREADS"):  # OpenMP read it when the forkserver loaded torch: set it here
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.path.insert(0, cwd)  # as `python -m` puts the working folder first
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # noqa: S110 - a closed stream has nothing left to write
                pass
        os._exit(code)


def sharing_cores(processes: int, env: dict | None = None) -> dict:
    """``env`` (default: this process's) for one of ``processes`` run at once: OMP_NUM_THREADS set to
    their share of the cores, so that their OpenMP threads do not spin against each other."""
    env = dict(os.environ if env is None else env)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # the suite's own workers share them too
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (processes * workers)))
    return env


def warm_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """``python -m module args...`` forked from the warm interpreter; returns a ``CompletedProcess``.
    Without ``env`` the child gets this process's environment as it is now (as ``subprocess`` does)."""
    global _context
    env = dict(os.environ) if env is None else env
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="liver-fcn-cmd-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        proc = _context.Process(target=_child, args=(module, list(args), str(cwd), env, str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([module, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(
            [sys.executable, "-m", module, *args], proc.exitcode, out.read_text(), err.read_text()
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(
    command: Callable[[int], list[str]],
    probe: str,
    log_path: Path,
    *,
    env=None,
    timeout: float = 120,
    port: int | None = None,
) -> Iterator[str]:
    """Run ``command(port)`` (a server listening on 127.0.0.1) until the block ends; yields its URL once
    ``GET probe`` answers 200. A free port can be taken by another process between the probe and the
    server's bind: the server then exits and is started again on another port (unless ``port`` is
    given: a server started again where its clients expect it). The server's process group is stopped
    at the end (SIGTERM, then SIGKILL)."""
    fixed = port
    for attempt in range(5):
        port = fixed or free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline, up = time.time() + timeout, False
        while proc.poll() is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}{probe}", timeout=2) as resp:
                    if resp.status == 200 and proc.poll() is None:
                        up = True
                        break
            except OSError:
                pass
            time.sleep(0.5)
        if up:
            break
        _stop(proc)
        log.close()
        if time.time() >= deadline or attempt == 4:
            raise RuntimeError(f"{command(port)[:4]} did not start: {log_path.read_text()[-2000:]}")
    try:
        yield url
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
