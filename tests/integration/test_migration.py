"""Live migration between two real qmon processes over loopback (and unix:, exec:)."""

import os
import signal
import socket
import time

import pytest

from conftest import free_port

GLOBALS = ["globals:", "store-global-state: on", "only-migratable: off",
           "send-configuration: on", "send-section-footer: on", "decompress-error-check: on",
           "clear-bitmap-shift: 18"]


def field(lines, name):
    for line in lines:
        if line.startswith(name + ": "):
            return line[len(name) + 2:]
    return None


def status(lines):
    s = field(lines, "Migration status")
    return s.split(" (")[0] if s else None


def random_ram(path, size, zero_every=5):
    data = bytearray(os.urandom(size))
    for page in range(0, size // 4096, zero_every):
        data[page * 4096:(page + 1) * 4096] = bytes(4096)
    path.write_bytes(data)


@pytest.fixture
def pair(qmon_proc, tmp_path):
    """start(src_args, dst_args) -> (src, dst, uri), both on -mem-path files in tmp_path."""

    def start(src_args=(), dst_args=(), size="16M", uri=None):
        port = free_port()
        uri = uri or f"tcp:127.0.0.1:{port}"
        snaps = str(tmp_path / "snaps")
        dst = qmon_proc("-m", size, "-mem-path", str(tmp_path / "dst.ram"), "-incoming", uri,
                        "-snapshot-dir", snaps, *dst_args)
        assert dst.cmd("info status") == ["VM status: paused (inmigrate)"]
        src = qmon_proc("-m", size, "-mem-path", str(tmp_path / "src.ram"),
                        "-snapshot-dir", snaps, *src_args)
        return src, dst, uri

    return start


def test_destination_waits_and_answers(pair):
    src, dst, uri = pair(dst_args=("-M", "lab"))
    info = dst.cmd("info migrate")
    assert info == GLOBALS + ["socket address: [", "\t" + uri, "]"]
    assert dst.cmd("migrate tcp:127.0.0.1:1") == [
        "Error: Guest is waiting for an incoming migration"]
    assert dst.cmd("info status") == ["VM status: paused (inmigrate)"]


def test_idle_guest_with_random_ram_arrives_byte_for_byte(pair, tmp_path):
    random_ram(tmp_path / "src.ram", 16 << 20)
    src, dst, uri = pair(src_args=("-M", "none", "-workload", "idle"),
                         dst_args=("-M", "none"))
    src.cmd("migrate_set_parameter max-bandwidth 10G")
    assert src.cmd(f"migrate {uri}") == []
    info = src.cmd("info migrate")
    assert info[:len(GLOBALS)] == GLOBALS
    body = info[len(GLOBALS):]
    assert [l.split(":")[0] for l in body] == [
        "Migration status", "total time", "downtime", "setup", "transferred ram",
        "throughput", "remaining ram", "total ram", "duplicate", "skipped", "normal",
        "normal bytes", "dirty sync count", "page size", "multifd bytes", "pages-per-second"] + \
        [l.split(":")[0] for l in body[16:]]
    assert status(info) == "completed"
    assert field(info, "total ram") == "16384 kbytes"
    assert int(field(info, "duplicate").split()[0]) >= (16 << 20) // 4096 // 5
    assert src.cmd("info status") == ["VM status: paused (postmigrate)"]
    assert src.cmd(f"migrate {uri}") == [
        "Error: Can't migrate the vm that was paused due to previous migration"]
    dst.wait_for("info status", lambda o: o == ["VM status: running"])
    assert status(dst.cmd("info migrate")) == "completed"
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_busy_counter_guest_keeps_its_invariant(pair, tmp_path):
    src, dst, uri = pair(src_args=("-workload", "counter,speed=100000"), dst_args=("-S",))
    time.sleep(0.3)
    assert src.cmd(f"migrate {uri}") == []
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst.cmd("info workload")[-1] == "invariant: ok"
    assert src.cmd("info workload")[-1] == "invariant: ok"
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()
    assert dst.cmd("info registers") == src.cmd("info registers")[:-1] + \
        [dst.cmd("info registers")[-1]]  # all but the TSC line, which follows each clock
    dst.cmd("cont")
    time.sleep(0.2)
    dst.cmd("stop")
    assert dst.cmd("info workload")[-1] == "invariant: ok"


def test_forced_multi_pass_migration_converges_when_relaxed(pair, tmp_path):
    # QEMU's own test trick: a tiny bandwidth and a 1 ms downtime limit cannot converge;
    # once pages sent have been dirtied again, relax the limits.
    src, dst, uri = pair(src_args=("-workload", "counter,speed=20000"), dst_args=("-S",),
                         size="8M")
    src.cmd("migrate_set_parameter max-bandwidth 4M")
    src.cmd("migrate_set_parameter downtime-limit 1")
    assert src.cmd(f"migrate -d {uri}") == []
    info = src.wait_for("info migrate", lambda o: int(field(o, "dirty sync count") or 0) >= 2,
                        timeout=30)
    assert status(info) == "active"
    assert field(info, "expected downtime") is not None
    assert src.cmd("info status") == ["VM status: running"]
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    src.cmd("migrate_set_parameter downtime-limit 300")
    info = src.wait_for("info migrate", lambda o: status(o) == "completed", timeout=30)
    assert int(field(info, "dirty sync count")) >= 3
    passes = src.cmd("info migrate_passes")
    assert passes[0].split() == ["pass", "duration", "pages", "zero", "dirtied", "bandwidth",
                                 "exp.downtime", "pending"]
    chart = passes.index("dirty memory left at the end of each pass:")
    rows = passes[1:chart]
    assert len(rows) >= 2 and [int(r.split()[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0].split()[3] == "2048"  # the first pass sends every page of the 8 MiB
    assert int(rows[1].split()[5]) > 0  # pages dirtied again during the second pass
    assert passes[chart + 1].startswith("   1 |#")
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst.cmd("info workload")[-1] == "invariant: ok"
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_xbzrle_sends_deltas(pair, tmp_path):
    random_ram(tmp_path / "src.ram", 4 << 20)  # pages worth sending, so passes take time
    src, dst, uri = pair(src_args=("-M", "none", "-workload", "dirty,rate=2M,wss=1M"),
                         dst_args=("-M", "none", "-S"), size="4M")
    src.cmd("migrate_set_capability xbzrle on")
    src.cmd("migrate_set_parameter xbzrle-cache-size 4M")
    src.cmd("migrate_set_parameter max-bandwidth 2M")
    src.cmd("migrate_set_parameter downtime-limit 1")
    src.cmd(f"migrate -d {uri}")
    info = src.wait_for("info migrate",
                        lambda o: int((field(o, "xbzrle pages") or "0").split()[0]) > 20,
                        timeout=40)
    assert field(info, "cache size") == "4194304 bytes"
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    src.cmd("migrate_set_parameter downtime-limit 300")
    info = src.wait_for("info migrate", lambda o: status(o) == "completed", timeout=30)
    assert int(field(info, "xbzrle cache miss").split()[0]) > 0
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_auto_converge_throttles_until_it_converges(pair, tmp_path):
    random_ram(tmp_path / "src.ram", 8 << 20)
    src, dst, uri = pair(src_args=("-M", "none", "-workload", "dirty,rate=32M,wss=4M"),
                         dst_args=("-M", "none", "-S"), size="8M")
    src.cmd("migrate_set_capability auto-converge on")
    src.cmd("migrate_set_parameter max-bandwidth 8M")
    src.cmd("migrate_set_parameter downtime-limit 20")
    src.cmd(f"migrate -d {uri}")
    info = src.wait_for("info migrate",
                        lambda o: field(o, "cpu throttle percentage") is not None, timeout=60,
                        interval=0.2)
    assert status(info) == "active"
    assert int(field(info, "cpu throttle percentage")) >= 20
    assert int(field(info, "dirty pages rate").split()[0]) > 0
    info = src.wait_for("info migrate", lambda o: status(o) == "completed", timeout=90,
                        interval=0.2)
    assert src.cmd("info migrate_capabilities")[2] == "auto-converge: on"
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_cancel_while_active_keeps_the_source_and_a_retry_works(pair, qmon_proc, tmp_path):
    src, dst, uri = pair(src_args=("-workload", "counter,speed=20000"))
    src.cmd("migrate_set_parameter max-bandwidth 1M")
    src.cmd(f"migrate -d {uri}")
    src.wait_for("info migrate", lambda o: status(o) == "active")
    assert src.cmd(f"migrate {uri}") == ["Error: There's a migration process in progress"]
    assert src.cmd("migrate_set_capability xbzrle on") == [
        "Error: There's a migration process in progress"]
    src.cmd("migrate_cancel")
    info = src.wait_for("info migrate", lambda o: status(o) == "cancelled")
    assert info[len(GLOBALS):] == ["Migration status: cancelled", "total time: 0 ms"]
    assert src.cmd("info status") == ["VM status: running"]
    assert src.cmd("info workload")[-1] == "invariant: ok"
    # the destination lost its stream: it fails as QEMU does
    assert dst.proc.wait(10) == 1
    assert any("load of migration failed" in l for l in dst.stderr_lines)
    # a retry to a fresh destination succeeds
    port = free_port()
    fresh = qmon_proc("-m", "16M", "-incoming", f"tcp:127.0.0.1:{port}", "-S",
                      "-snapshot-dir", str(tmp_path / "snaps"))
    assert fresh.cmd("info status") == ["VM status: paused (inmigrate)"]
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    assert src.cmd(f"migrate tcp:127.0.0.1:{port}") == []
    fresh.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert fresh.cmd("info workload")[-1] == "invariant: ok"


def test_cancel_in_setup(qmon_proc, tmp_path):
    # A TCP listener whose accept queue is full: the kernel drops the SYN, connect() waits,
    # and the migration stays in setup.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect(("127.0.0.1", port))
        except OSError:
            pass  # the queue is full now
        fillers.append(c)
    src = qmon_proc("-M", "none", "-m", "1M", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
    info = src.cmd("info migrate")
    assert info[len(GLOBALS):] == ["Migration status: setup", "total time: 0 ms"]
    src.cmd("migrate_cancel")
    assert status(src.cmd("info migrate")) == "cancelled"
    assert src.cmd("info status") == ["VM status: running"]
    server.close()
    for c in fillers:
        c.close()


def test_pause_before_switchover_cancel_and_continue(pair):
    src, dst, uri = pair(src_args=("-workload", "counter,speed=5000"), dst_args=("-S",))
    src.cmd("migrate_set_capability pause-before-switchover on")
    src.cmd(f"migrate -d {uri}")
    info = src.wait_for("info migrate", lambda o: status(o) == "pre-switchover")
    assert src.cmd("info status") == ["VM status: paused (finish-migrate)"]
    assert src.cmd("migrate_continue active") == [
        "Error: Migration not in expected state: pre-switchover"]
    src.cmd("migrate_cancel")
    src.wait_for("info migrate", lambda o: status(o) == "cancelled")
    assert src.cmd("info status") == ["VM status: running"]


def test_pause_before_switchover_continue_completes(pair, tmp_path):
    src, dst, uri = pair(src_args=("-workload", "counter,speed=5000"), dst_args=("-S",))
    src.cmd("migrate_set_capability pause-before-switchover on")
    src.cmd(f"migrate -d {uri}")
    src.wait_for("info migrate", lambda o: status(o) == "pre-switchover")
    src.cmd("migrate_continue pre-switchover")
    src.wait_for("info migrate", lambda o: status(o) == "completed")
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst.cmd("info workload")[-1] == "invariant: ok"
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_refused_port(qmon_proc, tmp_path):
    src = qmon_proc("-M", "none", "-m", "1M", "-snapshot-dir", str(tmp_path / "s"))
    port = free_port()
    assert src.cmd(f"migrate tcp:127.0.0.1:{port}") == []
    info = src.cmd("info migrate")
    assert info[len(GLOBALS):] == [
        f"Migration status: failed (Failed to connect to '127.0.0.1:{port}': "
        "Connection refused)", "total time: 0 ms"]
    assert any("migration failed" in l for l in src.stderr_lines)
    assert src.cmd("info status") == ["VM status: running"]


def test_destination_killed_mid_stream(pair, qmon_proc, tmp_path):
    src, dst, uri = pair(src_args=("-workload", "counter,speed=20000"))
    src.cmd("migrate_set_parameter max-bandwidth 1M")
    src.cmd(f"migrate -d {uri}")
    src.wait_for("info migrate", lambda o: status(o) == "active")
    time.sleep(0.3)
    dst.proc.send_signal(signal.SIGKILL)
    dst.proc.wait()
    info = src.wait_for("info migrate", lambda o: status(o) == "failed", timeout=30)
    assert "socket" in field(info, "Migration status")
    assert src.cmd("info status") == ["VM status: running"]
    assert src.cmd("info workload")[-1] == "invariant: ok"


def test_unix_channel(qmon_proc, tmp_path):
    path = str(tmp_path / "mig.sock")
    dst = qmon_proc("-m", "8M", "-S", "-incoming", f"unix:{path}", "-mem-path",
                    str(tmp_path / "d.ram"), "-snapshot-dir", str(tmp_path / "s"))
    assert dst.cmd("info migrate")[-3:] == ["socket address: [", f"\tunix:{path}", "]"]
    src = qmon_proc("-m", "8M", "-mem-path", str(tmp_path / "s.ram"), "-snapshot-dir",
                    str(tmp_path / "s"))
    src.cmd(f"migrate unix:{path}")
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert (tmp_path / "d.ram").read_bytes() == (tmp_path / "s.ram").read_bytes()


def test_exec_channels_through_a_file(qmon_proc, tmp_path):
    stream = tmp_path / "stream.bin"
    random_ram(tmp_path / "s.ram", 4 << 20)
    src = qmon_proc("-M", "none", "-m", "4M", "-S", "-mem-path", str(tmp_path / "s.ram"),
                    "-snapshot-dir", str(tmp_path / "s"))
    assert src.cmd(f'migrate "exec:cat > {stream}"') == []
    assert status(src.cmd("info migrate")) == "completed"
    assert stream.read_bytes()[:4] == b"QEVM"
    dst = qmon_proc("-M", "none", "-m", "4M", "-incoming", f"exec:cat {stream}", "-mem-path",
                    str(tmp_path / "d.ram"), "-snapshot-dir", str(tmp_path / "s"))
    # the source was paused in prelaunch: the destination takes that state
    dst.wait_for("info status", lambda o: o == ["VM status: paused (prelaunch)"])
    assert (tmp_path / "d.ram").read_bytes() == (tmp_path / "s.ram").read_bytes()


def test_incoming_defer(qmon_proc, tmp_path):
    port = free_port()
    dst = qmon_proc("-M", "none", "-m", "2M", "-incoming", "defer", "-snapshot-dir",
                    str(tmp_path / "s"))
    assert dst.cmd("info migrate") == GLOBALS
    assert dst.cmd(f"migrate_incoming tcp:127.0.0.1:{port}") == []
    assert dst.cmd(f"migrate_incoming tcp:127.0.0.1:{port}") == [
        "Error: The incoming migration has already been started"]
    src = qmon_proc("-M", "none", "-m", "2M", "-snapshot-dir", str(tmp_path / "s"))
    assert src.cmd("migrate_incoming tcp:127.0.0.1:1") == [
        "Error: '-incoming' was not specified on the command line"]
    src.cmd(f"migrate tcp:127.0.0.1:{port}")
    dst.wait_for("info status", lambda o: o == ["VM status: running"])


def test_a_stream_the_destination_cannot_take_ends_it_with_status_1(qmon_proc, tmp_path):
    port = free_port()
    dst = qmon_proc("-M", "none", "-m", "32M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", str(tmp_path / "s"))
    dst.cmd("info status")
    src = qmon_proc("-M", "none", "-m", "16M", "-snapshot-dir", str(tmp_path / "s"))
    src.cmd(f"migrate tcp:127.0.0.1:{port}")
    assert dst.proc.wait(20) == 1
    assert "qmon: load of migration failed: Size mismatch: ram: 0x1000000 != 0x2000000: " \
           "Invalid argument" in dst.stderr_lines


def test_the_monitor_answers_during_a_migration(pair, tmp_path):
    random_ram(tmp_path / "src.ram", 64 << 20)  # 64 MiB at 16 MiB/s: several seconds
    src, dst, uri = pair(src_args=("-M", "none", "-workload", "idle"), dst_args=("-M", "none"),
                         size="64M")
    src.cmd("migrate_set_parameter max-bandwidth 16M")
    src.cmd(f"migrate -d {uri}")
    for _ in range(5):
        info = src.cmd("info migrate")
        assert status(info) in ("setup", "active")
        assert dst.cmd("info status") == ["VM status: paused (inmigrate)"]
        assert status(dst.cmd("info migrate")) in (None, "active")
    src.cmd("migrate_cancel")


def test_a_stalled_peer_fails_the_migration_and_the_source_runs_on(qmon_proc, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    random_ram(tmp_path / "s.ram", 32 << 20)
    src = qmon_proc("-M", "none", "-m", "32M", "-mem-path", str(tmp_path / "s.ram"),
                    "-snapshot-dir", str(tmp_path / "s"),
                    env={"QMON_MIGRATION_STALL_TIMEOUT": "1.5"})
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    src.cmd(f"migrate -d tcp:127.0.0.1:{port}")
    conn, _ = server.accept()  # ...and never read a byte
    info = src.wait_for("info migrate", lambda o: status(o) == "failed", timeout=30)
    assert "timed out" in field(info, "Migration status")
    assert src.cmd("info status") == ["VM status: running"]
    conn.close()
    server.close()


def test_cancel_right_after_continue_never_leaves_two_running_copies(pair):
    for _ in range(3):
        src, dst, uri = pair(src_args=("-workload", "counter,speed=5000"))
        src.cmd("migrate_set_capability pause-before-switchover on")
        src.cmd(f"migrate -d {uri}")
        src.wait_for("info migrate", lambda o: status(o) == "pre-switchover")
        assert src.cmd("cont") == ["Error: Migration is not finalized yet"]
        src.proc.stdin.write("migrate_continue pre-switchover\nmigrate_cancel\n")
        src.proc.stdin.flush()
        final = src.wait_for("info migrate", lambda o: status(o) in ("completed", "cancelled"))
        src_running = src.cmd("info status") == ["VM status: running"]
        if status(final) == "cancelled":
            assert src_running
            assert dst.proc.wait(20) == 1  # the destination never got the whole stream
        else:
            assert not src_running
            dst.wait_for("info status", lambda o: o == ["VM status: running"])
        src.close()
        dst.close()


def test_no_snapshot_while_migrating_and_unlimited_bandwidth(pair, tmp_path):
    random_ram(tmp_path / "src.ram", 16 << 20)
    src, dst, uri = pair(src_args=("-M", "none"), dst_args=("-M", "none"))
    src.cmd("migrate_set_parameter max-bandwidth 1M")
    src.cmd(f"migrate -d {uri}")
    src.wait_for("info migrate", lambda o: status(o) == "active")
    assert src.cmd("savevm during") == ["Error: There's a migration process in progress"]
    assert src.cmd("loadvm during") == ["Error: There's a migration process in progress"]
    assert src.cmd("info snapshots") == ["There is no snapshot available."]
    src.cmd("migrate_set_parameter max-bandwidth 0")  # 0 means no limit, as in QEMU
    src.wait_for("info migrate", lambda o: status(o) == "completed", timeout=30)
    dst.wait_for("info status", lambda o: o == ["VM status: running"])
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()


def test_parameter_errors_are_qemus(qmon_proc, tmp_path):
    src = qmon_proc("-M", "none", "-m", "1M", "-snapshot-dir", str(tmp_path / "s"))
    cases = {
        "migrate_set_parameter downtime-limit 2000001":
            "Error: Parameter 'downtime_limit' expects an integer in the range of 0 to "
            "(2000 * 1000) ms",
        "migrate_set_parameter xbzrle-cache-size 5000":
            "Error: Parameter 'xbzrle_cache_size' expects a power of two no less than the "
            "target page size",
        "migrate_set_parameter cpu-throttle-initial 256":
            "Error: Parameter 'cpu-throttle-initial' expects uint8_t",
        "migrate_set_parameter cpu-throttle-initial 100":
            "Error: Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
        "migrate_set_parameter max-cpu-throttle 10":
            "Error: Parameter 'max_cpu_throttle' expects an integer in the range of "
            "cpu_throttle_initial to 99",
        "migrate_set_parameter throttle-trigger-threshold 101":
            "Error: Parameter 'throttle_trigger_threshold' expects an integer in the range of "
            "1 to 100",
        "migrate_set_parameter max-bandwidth abc": "Error: Invalid size abc",
        "migrate_continue pre-switchover": "Error: Migration not in expected state: none",
    }
    for cmd, msg in cases.items():
        assert src.cmd(cmd) == [msg], cmd
    assert src.cmd("migrate_set_parameter xbzrle-cache-size 65536") == []  # bytes, as in QEMU
    assert "xbzrle-cache-size: 65536 bytes" in src.cmd("info migrate_parameters")
