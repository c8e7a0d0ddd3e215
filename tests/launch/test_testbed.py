"""The two-host test bed: link, addresses, shaping, results, and teardown in every way out."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from sparsetrain.launch import testbed as tb
from sparsetrain.launch.testbed import TestbedUnavailable, TwoHostTestbed, list_testbed_namespaces

PY = sys.executable
netns = pytest.mark.netns

SERVER = textwrap.dedent("""\
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 5555)); s.listen(1)
    c, peer = s.accept(); n = 0; t0 = None
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        t0 = t0 or time.perf_counter()
        n += len(b)
    print(peer[0], n, n * 8 / (time.perf_counter() - t0))
    """)
CLIENT = textwrap.dedent("""\
    import os, socket, sys, time
    for _ in range(200):
        try:
            s = socket.create_connection((sys.argv[1], 5555)); break
        except OSError:
            time.sleep(0.02)
    block = b"x" * (1 << 16)
    for _ in range(int(sys.argv[2])):
        s.sendall(block)
    s.close()
    print(os.environ["GLOO_SOCKET_IFNAME"], os.environ.get("EXTRA"), os.environ["NCCL_SOCKET_IFNAME"],
          os.environ["NCCL_HOSTID"], os.environ["NCCL_IB_DISABLE"], file=sys.stderr)
    """)


def _skip_unless_available(**kw):
    reason = tb.unavailable_reason(**kw)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def bed():
    _skip_unless_available()
    with TwoHostTestbed() as b:
        yield b


def _root_veths():
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if tb.INTERFACE + "@" in line]


@netns
def test_link_carries_traffic_between_hosts(bed):
    a0, a1 = bed.addresses
    res = bed.run([[PY, "-c", SERVER, a0], [PY, "-c", CLIENT, a0, "16"]], env=[{}, {"EXTRA": "yes"}], timeout=60)
    assert [r.returncode for r in res] == [0, 0], (res[0].stderr, res[1].stderr)
    peer, nbytes, _ = res[0].stdout.split()
    assert (peer, int(nbytes)) == (a1, 16 << 16)
    # the link's interface for gloo and NCCL, and a NCCL host id per host (NCCL sees two machines)
    assert res[1].stderr.split() == [tb.INTERFACE, "yes", tb.INTERFACE, bed.namespaces[1], "1"]
    assert bed.host_env(0)["NCCL_HOSTID"] != bed.host_env(1)["NCCL_HOSTID"]
    assert not res[0].timed_out and res[0].seconds > 0


@netns
def test_each_host_sees_only_its_link(bed):
    res = bed.run([["ip", "-o", "-4", "addr"], ["ip", "-o", "-4", "addr"]], timeout=30)
    for host, r in enumerate(res):
        addrs = {(line.split()[1], line.split()[3]) for line in r.stdout.splitlines()}
        assert addrs == {("lo", "127.0.0.1/8"), (tb.INTERFACE, f"{bed.addresses[host]}/24")}


@netns
def test_rate_shaping_limits_throughput():
    _skip_unless_available(shaping=True)
    with TwoHostTestbed(rate="20mbit") as bed:
        a0 = bed.addresses[0]
        # 2.6 MB at 20 Mbit/s: about one second.
        res = bed.run([[PY, "-c", SERVER, a0], [PY, "-c", CLIENT, a0, "40"]], timeout=60)
    assert [r.returncode for r in res] == [0, 0], res[1].stderr
    rate = float(res[0].stdout.split()[2])
    assert 0.6 * 20e6 < rate < 1.1 * 20e6, rate


@netns
def test_delay_needs_netem_or_adds_latency():
    _skip_unless_available(shaping=True)
    ping = textwrap.dedent("""\
        import socket, sys, time
        for _ in range(200):
            try:
                s = socket.create_connection((sys.argv[1], 5555)); break
            except OSError:
                time.sleep(0.02)
        t = time.perf_counter(); s.sendall(b"x" * 10); s.close()
        """)
    try:
        bed = TwoHostTestbed(delay="50ms").__enter__()
    except TestbedUnavailable as e:
        assert "netem" in str(e)
        mine = f"sparsetrain-{os.getpid()}-"
        # a failed set-up removed what it had made (beds of other programs may exist meanwhile)
        assert not [n for n in list_testbed_namespaces() if n.startswith(mine)]
        return
    try:
        start = time.perf_counter()
        res = bed.run([[PY, "-c", SERVER, bed.addresses[0]], [PY, "-c", ping, bed.addresses[0]]], timeout=30)
        assert [r.returncode for r in res] == [0, 0]
        assert res[1].seconds >= 0.1 and time.perf_counter() - start >= 0.1  # SYN + ACK round trip: 2 x 50 ms
    finally:
        bed.__exit__(None, None, None)


@netns
def test_timeout_kills_and_reports(bed):
    start = time.monotonic()
    res = bed.run([["sleep", "30"], [PY, "-c", "print('done')"]], timeout=1.5)
    assert time.monotonic() - start < 10
    assert res[0].timed_out and res[0].returncode == -signal.SIGTERM
    assert not res[1].timed_out and res[1].returncode == 0 and res[1].stdout == "done\n"


@netns
def test_fail_fast_stops_the_peer_of_a_failed_host(bed):
    start = time.monotonic()
    res = bed.run([["sleep", "30"], [PY, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]],
                  fail_fast=0.5, timeout=60)
    assert time.monotonic() - start < 10
    assert res[1].returncode == 3 and res[1].stderr == "boom"
    assert res[0].returncode == -signal.SIGTERM and not res[0].timed_out


@netns
def test_none_runs_nothing_and_logs_are_kept(bed, tmp_path):
    res = bed.run([None, ["sh", "-c", "echo out; echo err >&2; exit 4"]], log_dir=str(tmp_path), timeout=30)
    assert res[0].returncode is None
    assert (res[1].returncode, res[1].stdout, res[1].stderr) == (4, "out\n", "err\n")
    assert (tmp_path / "host1.out").read_text() == "out\n"


def _assert_gone(names):
    present = set(list_testbed_namespaces())
    assert not present & set(names), present
    assert not _root_veths()


@netns
def test_teardown_after_normal_exit_kills_leftover_processes():
    _skip_unless_available()
    with TwoHostTestbed() as bed:
        names = bed.namespaces
        assert set(names) <= set(list_testbed_namespaces())
        p = bed.popen(0, ["sleep", "300"])
        # a process that left our session (daemonised) is found through the namespace
        bed.run([None, ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 &"]], timeout=30)
        time.sleep(0.2)
        daemons = bed.pids(1)
        assert daemons
    _assert_gone(names)
    assert p.returncode is not None
    for pid in daemons:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@netns
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_teardown_on_exception_and_ctrl_c(exc):
    _skip_unless_available()
    with pytest.raises(exc):
        with TwoHostTestbed() as bed:
            names = bed.namespaces
            bed.popen(1, ["sleep", "300"])
            raise exc("stop")
    _assert_gone(names)


HOLDER = textwrap.dedent("""\
    import sys, time
    from sparsetrain.launch.testbed import TwoHostTestbed
    with TwoHostTestbed() as bed:
        bed.popen(0, ["sleep", "300"])
        print(" ".join(bed.namespaces), flush=True)
        time.sleep(300)
    """)


def _default_signal_dispositions():
    # The owner handles only signals it has not been told to ignore: under `nohup` (SIGHUP ignored,
    # inherited by every child) the bed rightly leaves SIGHUP alone, so start the owner as a shell
    # with default dispositions would.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_teardown_when_the_owner_is_signalled(sig):
    _skip_unless_available()
    p = subprocess.Popen([PY, "-c", HOLDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_signal_dispositions)
    try:
        names = p.stdout.readline().split()
        assert len(names) == 2, p.stderr.read()
        p.send_signal(sig)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    _assert_gone(names)


@netns
def test_stale_namespaces_of_a_killed_owner_are_removed_by_the_next_bed():
    _skip_unless_available()
    p = subprocess.Popen([PY, "-c", HOLDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        names = p.stdout.readline().split()
        assert len(names) == 2, p.stderr.read()
    finally:
        p.kill()  # SIGKILL: no teardown ran
        p.wait()
    assert set(names) <= set(list_testbed_namespaces())
    with TwoHostTestbed():
        assert not set(names) & set(list_testbed_namespaces())
    _assert_gone(names)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rate="fast"), r"`rate` must be a positive tc rate like '100mbit'"),
        (dict(rate="0mbit"), r"`rate` must be a positive tc rate"),
        (dict(delay="5"), r"`delay` must be a time like '5ms'"),
    ],
)
def test_bad_shaping_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TwoHostTestbed(**kw)


@netns
@pytest.mark.parametrize(
    "args, kw, match",
    [
        ([["true"]], {}, r"`argvs` must hold one command per host \(2\)"),
        ([["true"], ["true"]], {"env": [{}]}, r"`env` must be a mapping or a list of 2 mappings"),
        ([["true"], ["true"]], {"timeout": 0}, r"`timeout` must be > 0 seconds"),
    ],
)
def test_bad_run_arguments(bed, args, kw, match):
    with pytest.raises(ValueError, match=match):
        bed.run(args, **kw)


def test_without_root_it_skips_with_a_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert tb.unavailable_reason() == (
        "the two-host test bed needs root (CAP_NET_ADMIN) to create network namespaces; running as uid 1000"
    )
    with pytest.raises(TestbedUnavailable, match="needs root"):
        TwoHostTestbed().__enter__()


def test_without_iproute2_it_skips_with_a_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(tb.shutil, "which", lambda name: None)
    assert tb.unavailable_reason() == "the two-host test bed needs iproute2's `ip` on PATH (apt-get install iproute2)"
