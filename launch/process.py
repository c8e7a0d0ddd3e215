"""Run a launcher command in the foreground: forward signals to it, return its exit code.

The command is started in its own session, so a Ctrl-C at the terminal reaches it once,
through us, instead of twice (the terminal's process group and our forwarding). Every
signal a scheduler or a user sends to stop or checkpoint a job (SIGINT, SIGTERM, SIGHUP,
SIGQUIT, SIGUSR1, SIGUSR2) is passed on unchanged; torchrun, the DeepSpeed launcher and
horovodrun pass it on to their workers. The command's exit status is ours; a command
killed by signal N gives 128 + N, as a shell reports it.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence

__all__ = ["FORWARDED_SIGNALS", "exit_status", "run_forwarding"]

FORWARDED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


def exit_status(returncode: int) -> int:
    """A Popen return code as a process exit status: ``-N`` (killed by signal N) -> ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def run_forwarding(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None
) -> int:
    """Run ``argv`` to completion, forwarding :data:`FORWARDED_SIGNALS` to it.

    Args:
        argv: the command (an argv list; no shell is involved).
        env: its environment (default: ours).
        cwd: its working directory.

    Returns:
        Its exit status (``128 + N`` when killed by signal ``N``).

    Raises:
        FileNotFoundError: the program is not found.
    """
    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                            start_new_session=True)
    previous = {}

    def forward(signum, _frame):
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            try:
                return exit_status(proc.wait())
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # we are leaving on an exception: do not orphan the job
            proc.kill()
            proc.wait()
