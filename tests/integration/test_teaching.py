"""Teaching features: trace events, strict versions (lab-1.0 / lab-2.0)."""

import pytest

from conftest import free_port, run_qmon, transcript_outputs


def outputs(args, commands, snapdir):
    status, out, err = run_qmon(list(args) + ["-snapshot-dir", snapdir],
                                "\n".join(commands) + "\n")
    assert "Traceback" not in out + err
    return status, [lines for _, lines in transcript_outputs(out)]


def test_trace_of_a_save_and_a_load(snapdir):
    status, got = outputs(
        ["-M", "none", "-m", "1M", "-S", "-trace", "savevm_*"],
        ["savevm b", "trace-event savevm* off", "trace-event qemu_loadvm* on",
         "trace-event loadvm_state* on", "loadvm b", "info trace-events savevm_state_h*"],
        snapdir)
    assert got[0] == [
        "savevm_state_header ", "savevm_state_setup ", "savevm_state_iterate ",
        "savevm_section_start ram, section_id 2", "savevm_section_end ram, section_id 2 -> 1",
        "savevm_state_complete_precopy ",
        "savevm_section_start ram, section_id 2", "savevm_section_end ram, section_id 2 -> 0",
        "savevm_section_start timer, section_id 0", "savevm_section_end timer, section_id 0 -> 0",
        "savevm_section_start globalstate, section_id 4",
        "savevm_section_end globalstate, section_id 4 -> 0", "savevm_state_cleanup "]
    assert got[4] == [
        "loadvm_state_setup ",
        "qemu_loadvm_state_section 1", "qemu_loadvm_state_section_startfull 2(ram) 0 4",
        "qemu_loadvm_state_section 2", "qemu_loadvm_state_section_partend 2",
        "qemu_loadvm_state_section 3", "qemu_loadvm_state_section_partend 2",
        "qemu_loadvm_state_section 4", "qemu_loadvm_state_section_startfull 0(timer) 0 2",
        "qemu_loadvm_state_section 4",
        "qemu_loadvm_state_section_startfull 4(globalstate) 0 1",
        "qemu_loadvm_state_section 0", "qemu_loadvm_state_post_main 0",
        "loadvm_state_cleanup "]
    assert got[5] == ["savevm_state_header : state 0"]


def test_trace_errors(snapdir):
    status, got = outputs(["-M", "none", "-m", "1M"],
                          ["trace-event nosuch on", "trace-event savevm_state_header maybe",
                           "trace-event"], snapdir)
    assert got == [['unknown event "nosuch"'],
                   ["Expected 'on' or 'off'", 'Try "help trace-event" for more information'],
                   ["trace-event: string expected",
                    'Try "help trace-event" for more information']]
    status, out, err = run_qmon(["-trace", "nosuch", "-snapshot-dir", snapdir], "")
    assert status == 1 and 'unknown event "nosuch"' in err


def test_version_matrix_loadvm(snapdir):
    # a lab-1.0 snapshot loads into lab-2.0: cpu v1 -> v2, the new field takes its default
    status, got = outputs(["-M", "lab-1.0", "-m", "1M", "-S"], ["savevm old"], snapdir)
    assert status == 0
    status, got = outputs(["-M", "lab-2.0", "-m", "1M", "-S"],
                          ["loadvm old", "info registers", "savevm new"], snapdir)
    assert got[0] == [] and got[1][-1].endswith("XCR0=0000000000000001")
    # a lab-2.0 snapshot does not load into lab-1.0, and changes nothing there
    status, got = outputs(["-M", "lab-1.0", "-m", "1M", "-S", "-workload", "idle"],
                          ["xp /1xb 0", "loadvm new", "info status", "xp /1xb 0"], snapdir)
    assert got[1] == ["Error: savevm: unsupported version 2 for 'cpu' v1"]
    assert got[2] == ["VM status: paused (prelaunch)"]
    assert got[0] == got[3]


def test_version_matrix_migration(qmon_proc, tmp_path):
    snaps = str(tmp_path / "s")
    port = free_port()
    dst = qmon_proc("-M", "lab-2.0", "-m", "2M", "-S", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", snaps)
    dst.cmd("info status")
    src = qmon_proc("-M", "lab-1.0", "-m", "2M", "-snapshot-dir", snaps)
    src.cmd(f"migrate tcp:127.0.0.1:{port}")
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst.cmd("info workload")[-1] == "invariant: ok"
    port = free_port()
    old = qmon_proc("-M", "lab-1.0", "-m", "2M", "-incoming", f"tcp:127.0.0.1:{port}",
                    "-snapshot-dir", snaps)
    old.cmd("info status")
    new = qmon_proc("-M", "lab", "-m", "2M", "-snapshot-dir", snaps)
    new.cmd(f"migrate tcp:127.0.0.1:{port}")
    assert old.proc.wait(20) == 1
    assert ("qmon: load of migration failed: savevm: unsupported version 2 for 'cpu' v1"
            in old.stderr_lines)


def _v2_save(qmon_proc, tmp_path, machine, name):
    path = tmp_path / name
    src = qmon_proc("-M", machine, "-m", "2M", "-mem-path", str(tmp_path / f"{name}.ram"),
                    "-workload", "counter,speed=20000", "-snapshot-dir", str(tmp_path / "s"))
    src.wait_for("info workload", lambda o: "page 0," not in o[3])
    assert src.cmd("migrate_set_parameter x-stream-version 2") == []
    assert src.cmd('migrate "exec:cat > /dev/null"') == [
        "Error: x-stream-version 2 cannot go to 'exec:': its writer seeks back to fill in "
        "record lengths, which only a file allows (use file:PATH)"]
    assert src.cmd(f"migrate file:{path}") == []
    assert src.cmd("info status") == ["VM status: paused (postmigrate)"]
    data = path.read_bytes()
    assert data[:8] == b"QEVM\0\0\0\x02" and int.from_bytes(data[8:16], "big") == len(data) - 16
    return path


def test_version_2_round_trip(qmon_proc, tmp_path):
    path = _v2_save(qmon_proc, tmp_path, "lab", "v2.stream")
    dst = qmon_proc("-M", "lab", "-m", "2M", "-S", "-incoming", f"file:{path}", "-mem-path",
                    str(tmp_path / "dst.ram"), "-snapshot-dir", str(tmp_path / "s"))
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst.cmd("info workload")[-1] == "invariant: ok"
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "v2.stream.ram").read_bytes()


def test_version_2_is_lax_where_version_3_is_strict(qmon_proc, tmp_path):
    path = _v2_save(qmon_proc, tmp_path, "lab-2.0", "new.stream")
    # a cpu v2 record loads into lab-1.0 (cpu v1) blindly: no error, the new field lost
    old = qmon_proc("-M", "lab-1.0", "-m", "2M", "-S", "-incoming", f"file:{path}",
                    "-snapshot-dir", str(tmp_path / "s"))
    old.wait_for("info status", lambda o: o == ["VM status: paused"])
    # an unknown record is skipped with a warning, and the load goes on
    data = path.read_bytes().replace(b"\x06serial", b"\x06sexial")
    (tmp_path / "odd.stream").write_bytes(data)
    odd = qmon_proc("-M", "lab", "-m", "2M", "-S", "-incoming",
                    f"file:{tmp_path / 'odd.stream'}", "-snapshot-dir", str(tmp_path / "s"))
    odd.wait_for("info status", lambda o: o[-1] == "VM status: paused")
    assert "savevm: unknown section 'sexial' 0 in a v2 stream: skipped" in odd.seen


def test_block_migration_interleaves_with_ram_and_the_disk_arrives(qmon_proc, tmp_path):
    import os

    from machine.machine import Machine
    from machine.savevm.records import SectionHeader, parse_bytes
    from machine.savevm.savevm import Loader

    src_disk, dst_disk = tmp_path / "src.img", tmp_path / "dst.img"
    src_disk.write_bytes(os.urandom(8 << 20))
    dst_disk.write_bytes(bytes(8 << 20))
    snaps = str(tmp_path / "s")
    port = free_port()
    dst = qmon_proc("-m", "8M", "-S", "-drive", f"file={dst_disk}", "-incoming",
                    f"tcp:127.0.0.1:{port}", "-mem-path", str(tmp_path / "dst.ram"),
                    "-snapshot-dir", snaps)
    dst.cmd("info status")
    src = qmon_proc("-m", "8M", "-drive", f"file={src_disk}", "-workload", "counter,speed=2000",
                    "-mem-path", str(tmp_path / "src.ram"), "-snapshot-dir", snaps)
    assert src.cmd("migrate -b -d tcp:1:1") == ["migrate: unsupported option -d",
                                                'Try "help migrate" for more information']
    src.cmd("migrate_set_parameter max-bandwidth 8M")
    src.cmd(f"migrate -d -b tcp:127.0.0.1:{port}")
    info = src.wait_for("info migrate", lambda o: any(l.startswith("transferred disk: ")
                                                      for l in o))
    assert [l.split(":")[0] for l in info if "disk" in l] == [
        "transferred disk", "remaining disk", "total disk"]
    assert "total disk: 8192 kbytes" in info
    src.cmd("migrate_set_parameter max-bandwidth 1G")
    src.wait_for("info migrate", lambda o: "Migration status: completed" in o)
    dst.wait_for("info status", lambda o: o == ["VM status: paused"])
    assert dst_disk.read_bytes() == src_disk.read_bytes()
    assert (tmp_path / "dst.ram").read_bytes() == (tmp_path / "src.ram").read_bytes()
    assert dst.cmd("info workload")[-1] == "invariant: ok"

    # The same migration into a file: its PART sections alternate between block and ram.
    stream = tmp_path / "b.stream"
    src2 = qmon_proc("-m", "4M", "-drive", f"file={src_disk}", "-snapshot-dir", snaps)
    src2.cmd("migrate_set_parameter max-bandwidth 16M")
    src2.cmd(f'migrate -b "exec:cat > {stream}"')
    m = Machine("lab", 4 << 20, drive=str(dst_disk))
    parts = [r.idstr for r in parse_bytes(stream.read_bytes(), Loader(m, False).describe)
             if isinstance(r, SectionHeader) and r.type_name == "PART"]
    assert parts[:4] == ["block", "ram", "block", "ram"]
