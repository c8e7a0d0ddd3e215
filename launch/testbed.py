"""Two "hosts" on one Linux machine: two network namespaces joined by a veth pair.

Each host is a network namespace with its loopback and one interface, :data:`INTERFACE`,
the two ends of a veth pair, addressed ``10.77.0.1/24`` and ``10.77.0.2/24``. Processes
started on a host see only that network, so a distributed job that runs across the two
talks over the veth link exactly as two machines would over a cable, and the link can
be shaped with ``tc`` (rate with a token bucket, delay with netem). The file system,
the CPUs and the memory are shared.

Everything the bed creates is removed when it closes, whatever happens: the ``with``
block raising, Ctrl-C (``KeyboardInterrupt``), SIGTERM/SIGHUP while it is open (turned
into ``SystemExit``), or the interpreter exiting. Processes still running on a host are
killed first (a namespace with processes in it would outlive its name). Namespaces left
by a bed whose process was SIGKILLed are removed by the next bed (:func:`cleanup_stale`).

Needs Linux, root (CAP_NET_ADMIN) and iproute2 (``ip``; ``tc`` for shaping):
:func:`unavailable_reason` says what is missing, and entering the bed raises
:class:`TestbedUnavailable` with that reason, so tests can skip with it.

Example::

    with TwoHostTestbed(rate="100mbit") as bed:          # doctest: +SKIP
        a0, a1 = bed.addresses
        server = [sys.executable, "-m", "http.server", "--bind", a0, "8000"]
        ...
        results = bed.run([argv_host0, argv_host1], env={"OMP_NUM_THREADS": "1"}, timeout=120)
        assert all(r.returncode == 0 for r in results), results[1].stderr
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ADDRESSES",
    "INTERFACE",
    "HostResult",
    "TestbedError",
    "TestbedUnavailable",
    "TwoHostTestbed",
    "cleanup_stale",
    "list_testbed_namespaces",
    "unavailable_reason",
]

INTERFACE = "st0"
ADDRESSES = ("10.77.0.1", "10.77.0.2")
PREFIX_LEN = 24
NAME_PREFIX = "sparsetrain-"
_NAME_RE = re.compile(r"^sparsetrain-(\d+)-([0-9a-f]+)-h([01])$")
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$", re.IGNORECASE)
_DELAY_RE = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


class TestbedUnavailable(RuntimeError):
    """The machine cannot host the test bed (not root, no iproute2, no netem, ...)."""

    __test__ = False  # not a pytest test class


class TestbedError(RuntimeError):
    """Setting up or tearing down the test bed failed."""

    __test__ = False


@dataclass
class HostResult:
    """What one host's command did.

    Attributes:
        host: 0 or 1.
        argv: the command.
        returncode: its exit code (negative: killed by that signal; ``None``: nothing ran).
        stdout: its standard output.
        stderr: its standard error.
        timed_out: it was killed because ``timeout`` expired.
        seconds: wall time from start to exit.
    """

    host: int
    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _rate_bits(rate: str) -> float:
    m = _RATE_RE.match(rate)
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def unavailable_reason(*, shaping: bool = False) -> str | None:
    """Why the bed cannot be created here, or ``None`` when it can (as far as can be told without trying).

    Args:
        shaping: also require ``tc`` (for ``rate``/``delay``).
    """
    if not sys.platform.startswith("linux"):
        return f"the two-host test bed needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return (f"the two-host test bed needs root (CAP_NET_ADMIN) to create network namespaces; "
                f"running as uid {os.geteuid()}")
    if shutil.which("ip") is None:
        return "the two-host test bed needs iproute2's `ip` on PATH (apt-get install iproute2)"
    if shaping and shutil.which("tc") is None:
        return "link shaping needs iproute2's `tc` on PATH (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns list` failed: {probe.stderr.strip()}"
    return None


def list_testbed_namespaces() -> list[str]:
    """Names of the network namespaces created by test beds (ours or others') that exist now."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NAME_RE.match(n)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    for _ in range(50):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_namespace(ns: str) -> str | None:
    _kill_namespace_processes(ns)
    r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
    if r.returncode != 0 and "No such file" not in r.stderr:
        return f"`ip netns del {ns}` failed: {r.stderr.strip()}"
    return None


def cleanup_stale() -> list[str]:
    """Remove test-bed namespaces whose creating process no longer exists; returns their names."""
    removed = []
    for ns in list_testbed_namespaces():
        pid = int(_NAME_RE.match(ns).group(1))
        if not _pid_alive(pid) and _delete_namespace(ns) is None:
            removed.append(ns)
    return removed


class TwoHostTestbed:
    """Two network namespaces joined by a (optionally shaped) veth link; a context manager.

    Args:
        rate: link rate in each direction, in ``tc`` units: ``"100mbit"``, ``"1gbit"``,
            ``"12.5mbps"`` (bytes/s). ``None``: unshaped (veth runs at memory speed).
        delay: one-way delay added in each direction (``"5ms"``, ``"200us"``); needs the
            kernel's netem qdisc. ``None``: no delay.

    Attributes:
        namespaces: the two namespace names (``ip netns exec NAME ...``).
        addresses: host 0's and host 1's address on the link.
        interface: the link's interface name, the same on both hosts.

    Raises:
        ValueError: ``rate`` or ``delay`` malformed (on construction).
        TestbedUnavailable: on entering, when the machine cannot host the bed.
        TestbedError: on entering, when setting up failed for another reason.
    """

    __test__ = False

    def __init__(self, *, rate: str | None = None, delay: str | None = None) -> None:
        if rate is not None and (not isinstance(rate, str) or not _RATE_RE.match(rate) or _rate_bits(rate) <= 0):
            raise ValueError(f"`rate` must be a positive tc rate like '100mbit', '1gbit' or '10mbps', got {rate!r}")
        if delay is not None and (not isinstance(delay, str) or not _DELAY_RE.match(delay)):
            raise ValueError(f"`delay` must be a time like '5ms', '200us' or '1s', got {delay!r}")
        self.rate = rate
        self.delay = delay
        token = secrets.token_hex(3)
        self.namespaces = tuple(f"{NAME_PREFIX}{os.getpid()}-{token}-h{i}" for i in range(2))
        self.addresses = ADDRESSES
        self.interface = INTERFACE
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._open = False
        self._old_handlers: dict[int, object] = {}

    # ---------------------------------------------------------------- set-up / teardown
    def __enter__(self) -> TwoHostTestbed:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)

    def open(self) -> None:
        """Create the namespaces, the link and the shaping (what ``with`` does on entry)."""
        if self._open:
            return
        reason = unavailable_reason(shaping=self.rate is not None or self.delay is not None)
        if reason is not None:
            raise TestbedUnavailable(reason)
        cleanup_stale()
        self._open = True
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            for ns in self.namespaces:
                self._ip("netns", "add", ns)
                self._created.append(ns)
            ns0, ns1 = self.namespaces
            self._ip("link", "add", INTERFACE, "netns", ns0, "type", "veth", "peer", "name", INTERFACE, "netns", ns1)
            for ns, addr in zip(self.namespaces, self.addresses):
                self._ip("-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", INTERFACE)
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "link", "set", INTERFACE, "up")
            for ns in self.namespaces:
                self._shape(ns)
        except BaseException:
            self.close(raise_errors=False)
            raise

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"`ip {' '.join(args)}` failed: {r.stderr.strip()}"
            if "Operation not permitted" in r.stderr or "Permission denied" in r.stderr:
                raise TestbedUnavailable(msg)
            raise TestbedError(msg)

    def _shape(self, ns: str) -> None:
        if self.rate is None and self.delay is None:
            return
        if self.delay is not None:
            qdisc = ["netem", "delay", self.delay] + (["rate", self.rate] if self.rate else [])
        else:
            # Token bucket: a burst of 10 ms at the rate (at least a few frames), and a queue
            # that holds 100 ms of traffic before dropping.
            burst = max(16 * 1024, int(_rate_bits(self.rate) / 8 / 100))
            qdisc = ["tbf", "rate", self.rate, "burst", str(burst), "latency", "100ms"]
        r = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", INTERFACE, "root", *qdisc],
                           capture_output=True, text=True)
        if r.returncode != 0:
            if qdisc[0] == "netem" and "unknown" in r.stderr.lower():
                raise TestbedUnavailable(
                    "`delay` needs the kernel's netem qdisc (sch_netem), which this kernel does not provide: "
                    + r.stderr.strip()
                )
            raise TestbedError(f"`tc qdisc add dev {INTERFACE} root {' '.join(qdisc)}` in {ns} failed: "
                               f"{r.stderr.strip()}")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def to_exit(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._old_handlers[sig] = signal.signal(sig, to_exit)

    def close(self, raise_errors: bool = True) -> None:
        """Kill what still runs on the hosts and remove the namespaces and the link (idempotent).

        Args:
            raise_errors: raise :class:`TestbedError` when something could not be removed
                (otherwise warn).
        """
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        for p in self._procs:
            _stop(p)
        self._procs.clear()
        errors = [e for e in (_delete_namespace(ns) for ns in self._created) if e]
        self._created.clear()
        left = [ns for ns in self.namespaces if ns in list_testbed_namespaces()]
        if left:
            errors.append(f"namespaces still present after teardown: {left}")
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
        self._old_handlers.clear()
        if errors:
            if raise_errors:
                raise TestbedError("; ".join(errors))
            warnings.warn("test bed teardown: " + "; ".join(errors), RuntimeWarning, stacklevel=2)

    # ---------------------------------------------------------------- running commands
    def host_env(self, host: int) -> dict[str, str]:
        """Variables every command on ``host`` gets.

        - ``GLOO_SOCKET_IFNAME``, ``TP_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``: the link's interface
          (both hosts have the machine's host name, which does not resolve to the link).
        - ``NCCL_HOSTID``: the host's namespace, so that NCCL treats the two hosts as two machines
          (else it sees one host, and may pair the ranks through shared memory or the GPUs'
          peer-to-peer path, or refuse two ranks on one GPU); with ``NCCL_P2P_DISABLE``,
          ``NCCL_SHM_DISABLE`` and ``NCCL_IB_DISABLE`` (InfiniBand devices are not confined to a
          network namespace), every byte between the hosts crosses the link.
        """
        self._check_host(host)
        return {
            "GLOO_SOCKET_IFNAME": INTERFACE, "TP_SOCKET_IFNAME": INTERFACE, "NCCL_SOCKET_IFNAME": INTERFACE,
            "NCCL_HOSTID": self.namespaces[host], "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
            "NCCL_IB_DISABLE": "1",
        }

    def _check_host(self, host: int) -> None:
        if host not in (0, 1):
            raise ValueError(f"`host` must be 0 or 1, got {host!r}")

    def popen(self, host: int, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in its own session and return the Popen (killed at teardown).

        ``env`` is added to this process's environment and :meth:`host_env`; other keyword
        arguments go to :class:`subprocess.Popen` (``stdout=``, ``stderr=``, ``text=``...).
        """
        self._check_host(host)
        if not self._open:
            raise TestbedError("the test bed is not open (use it inside `with TwoHostTestbed() as bed:`)")
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"`argv` must be a non-empty list of strings, got {argv!r}")
        full_env = {**os.environ, **self.host_env(host), **(env or {})}
        p = subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv], env=full_env, cwd=cwd,
                             start_new_session=True, **kwargs)
        self._procs.append(p)
        return p

    def pids(self, host: int) -> list[int]:
        """Process ids of everything running on ``host`` now."""
        self._check_host(host)
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def run(
        self,
        argvs: Sequence[Sequence[str] | None],
        *,
        env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
        fail_fast: float | None = 15.0,
        log_dir: str | None = None,
    ) -> list[HostResult]:
        """Run one command per host at the same time and wait for both.

        Args:
            argvs: ``[argv_host0, argv_host1]``; ``None`` runs nothing on that host.
            env: variables for both hosts, or a list of two mappings, one per host.
            timeout: seconds after which whatever still runs is killed (``timed_out``).
            cwd: working directory of both commands.
            fail_fast: when one command exits non-zero, kill the other after this many
                seconds (a peer of a dead process usually waits for it until a long
                network timeout); ``None`` waits for both regardless.
            log_dir: also keep ``host{i}.out`` / ``host{i}.err`` there.

        Returns:
            One :class:`HostResult` per host, in host order.
        """
        if isinstance(argvs, str) or len(argvs) != 2:
            raise ValueError(f"`argvs` must hold one command per host (2), got {argvs!r}")
        if env is None or isinstance(env, Mapping):
            envs = [env or {}, env or {}]
        else:
            if len(env) != 2:
                raise ValueError(f"`env` must be a mapping or a list of 2 mappings, got {len(env)}")
            envs = [e or {} for e in env]
        if timeout is not None and timeout <= 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout}")
        with tempfile.TemporaryDirectory(prefix="sparsetrain-bed-") as tmp:
            logs = log_dir or tmp
            os.makedirs(logs, exist_ok=True)
            running: dict[int, tuple[subprocess.Popen, float]] = {}
            files = []
            results: dict[int, HostResult] = {}
            try:
                for host, argv in enumerate(argvs):
                    if argv is None:
                        results[host] = HostResult(host, [], None, "", "", False, 0.0)
                        continue
                    out = open(os.path.join(logs, f"host{host}.out"), "w+b")
                    err = open(os.path.join(logs, f"host{host}.err"), "w+b")
                    files += [out, err]
                    p = self.popen(host, list(argv), env=envs[host], cwd=cwd, stdout=out, stderr=err)
                    running[host] = (p, time.monotonic())
                deadline = None if timeout is None else time.monotonic() + timeout
                kill_at = None
                timed_out = False
                while None in [p.poll() for p, _ in running.values()]:  # poll every one, no short-circuit
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        timed_out = True
                        break
                    if fail_fast is not None and kill_at is None and any(
                        p.returncode not in (None, 0) for p, _ in running.values()
                    ):
                        kill_at = now + fail_fast
                    if kill_at is not None and now >= kill_at:
                        break
                    time.sleep(0.05)
                ends = {}
                for host, (p, start) in running.items():
                    was_running = p.poll() is None
                    if was_running:
                        _stop(p)
                    ends[host] = (was_running and timed_out, time.monotonic() - start)
            finally:
                for p, _ in running.values():
                    if p.poll() is None:
                        _stop(p)
                for f in files:
                    f.close()
            for host, (p, _) in running.items():
                outs = []
                for stream in ("out", "err"):
                    with open(os.path.join(logs, f"host{host}.{stream}"), "rb") as f:
                        outs.append(f.read().decode(errors="replace"))
                to, secs = ends[host]
                results[host] = HostResult(host, list(argvs[host]), p.returncode, outs[0], outs[1], to, secs)
            return [results[0], results[1]]


def _stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the process group of ``p``, SIGKILL it after ``grace`` seconds."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
