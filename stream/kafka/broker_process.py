"""The embedded broker's JVM never outlives gruflow: child processes are spawned by one launcher thread with
PR_SET_PDEATHSIG (the kernel kills them if the Python parent dies), every running broker is stopped at
interpreter exit, and run directories of dead parents are swept."""

from __future__ import annotations
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable


RUN_DIR_PREFIX = "gruflow-kafka-"


_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """preexec_fn for the JVM: die with SIGKILL when the parent dies (even when the parent is SIGKILLed)."""

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # not Linux: rely on stop()/atexit/signal handlers
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen from a thread that lives as long as the process: the parent-death signal fires when the
    *thread* that forked the child ends, so a broker started from a short-lived worker thread would
    otherwise die with that thread."""
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(cmd, **kwargs)
    return _Launcher.instance().run(lambda: subprocess.Popen(cmd, **kwargs))


class _Launcher:
    """One daemon thread that only starts processes; it ends with the interpreter."""

    _instance: "_Launcher | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import queue

        self._jobs: "queue.Queue[tuple[Callable[[], Any], Any]]" = queue.Queue()
        threading.Thread(target=self._loop, name="gruflow-kafka-launcher", daemon=True).start()

    @classmethod
    def instance(cls) -> "_Launcher":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _loop(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def run(self, job: Callable[[], Any]) -> Any:
        from concurrent.futures import Future

        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future.result()


# every started broker of this process (stream.kafka.broker.EmbeddedKafka), stopped at interpreter exit
_live: set[Any] = set()
_live_lock = threading.Lock()


def _stop_all() -> None:
    with _live_lock:
        brokers = list(_live)
    for broker in brokers:
        broker.stop()


def _sweep_stale_run_dirs() -> None:
    """Remove run directories left by brokers whose Python owner was SIGKILLed (the JVM died with it)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # own session: pgid == pid
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)
