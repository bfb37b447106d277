"""The bytes of a savevm stream, walked field by field, and the parser that reads them."""

import json
import struct

import pytest

from machine.savevm import format as F
from machine.savevm.records import (EOF, Configuration, DeviceState, End, Footer, Header,
                                    RamEOS, RamMemSize, RamPage, RamZero, SectionHeader,
                                    StreamError, VMDesc, parse_bytes)
from machine.savevm.savevm import Loader, save_stream
from machine.savevm.stream import BytesSink, StreamWriter

# QEMU 7.2's vmdesc for -M none, verbatim from the reference.
NONE_VMDESC = ('{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": '
               '"timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", '
               '"size": 8}, {"name": "unused", "type": "unused_buffer", "size": 8}, {"name": '
               '"cpu_clock_offset", "type": "int64", "size": 8}]}, {"name": "globalstate", '
               '"instance_id": 0, "vmsd_name": "globalstate", "version": 1, "fields": [{"name": '
               '"size", "type": "uint32", "size": 4}, {"name": "runstate", "type": "buffer", '
               '"size": 100}]}]}')


def save(m) -> bytes:
    w = StreamWriter(BytesSink())
    m.run(save_stream, m, w)
    return bytes(w.sink.data)


class Walker:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, n):
        b = self.d[self.p:self.p + n]
        assert len(b) == n, f"stream ends at {self.p}"
        self.p += n
        return b

    def u8(self):
        return self.take(1)[0]

    def be32(self):
        return struct.unpack(">I", self.take(4))[0]

    def be64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def counted(self):
        return self.take(self.u8()).decode()


def test_none_16m_paused_stream_walked_field_by_field(make_machine):
    m = make_machine("none", 16 << 20, paused=True)
    data = save(m)
    assert len(data) == 37645  # QEMU 7.2 writes exactly this many bytes for this machine
    w = Walker(data)
    assert w.be32() == 0x5145564D and w.be32() == 3
    assert w.u8() == F.QEMU_VM_CONFIGURATION
    assert w.take(w.be32()) == b"none"
    # START ram: section 2, instance 0, version 4; MEM_SIZE and the block list, EOS, footer
    assert w.u8() == F.QEMU_VM_SECTION_START and w.be32() == 2
    assert w.counted() == "ram" and w.be32() == 0 and w.be32() == 4
    assert w.be64() == (16 << 20) | F.RAM_SAVE_FLAG_MEM_SIZE
    assert w.counted() == "ram" and w.be64() == 16 << 20
    assert w.be64() == F.RAM_SAVE_FLAG_EOS
    assert w.u8() == F.QEMU_VM_SECTION_FOOTER and w.be32() == 2
    # one PART: 4096 ZERO records, the first naming the block, the rest CONTINUE
    assert w.u8() == F.QEMU_VM_SECTION_PART and w.be32() == 2
    assert w.be64() == F.RAM_SAVE_FLAG_ZERO and w.counted() == "ram" and w.u8() == 0
    for page in range(1, 4096):
        assert w.be64() == (page << 12) | F.RAM_SAVE_FLAG_ZERO | F.RAM_SAVE_FLAG_CONTINUE
        assert w.u8() == 0
    assert w.be64() == F.RAM_SAVE_FLAG_EOS
    assert w.u8() == F.QEMU_VM_SECTION_FOOTER and w.be32() == 2
    # END: nothing left but EOS
    assert w.u8() == F.QEMU_VM_SECTION_END and w.be32() == 2
    assert w.be64() == F.RAM_SAVE_FLAG_EOS
    assert w.u8() == F.QEMU_VM_SECTION_FOOTER and w.be32() == 2
    # FULL timer (section 0, v2): ticks, 8 unused bytes, clock; the clock never ran
    assert w.u8() == F.QEMU_VM_SECTION_FULL and w.be32() == 0
    assert w.counted() == "timer" and w.be32() == 0 and w.be32() == 2
    assert w.be64() == 0 and w.take(8) == bytes(8) and w.be64() == 0
    assert w.u8() == F.QEMU_VM_SECTION_FOOTER and w.be32() == 0
    # FULL globalstate (section 4, v1): size = strlen+1, 100-byte buffer
    assert w.u8() == F.QEMU_VM_SECTION_FULL and w.be32() == 4
    assert w.counted() == "globalstate" and w.be32() == 0 and w.be32() == 1
    assert w.be32() == len("prelaunch") + 1
    assert w.take(100) == b"prelaunch".ljust(100, b"\0")
    assert w.u8() == F.QEMU_VM_SECTION_FOOTER and w.be32() == 4
    assert w.u8() == F.QEMU_VM_EOF
    assert w.u8() == F.QEMU_VM_VMDESCRIPTION
    assert w.take(w.be32()).decode() == NONE_VMDESC
    assert w.p == len(data)


def test_page_records_name_the_block_once(make_machine):
    m = make_machine("none", 1 << 20, paused=True)
    m.ram.write(0x3000, b"\xAA" * 4096)
    m.ram.write(0x5000, b"hello")
    recs = [r for r in parse_bytes(save(m), Loader(m, False).describe)
            if isinstance(r, (RamPage, RamZero))]
    assert len(recs) == 256
    assert [r.named for r in recs] == [True] + [False] * 255
    pages = {r.addr: r.data for r in recs if isinstance(r, RamPage)}
    assert set(pages) == {0x3000, 0x5000}
    assert pages[0x3000] == b"\xAA" * 4096 and pages[0x5000][:5] == b"hello"


def test_record_sequence_of_a_lab_stream(make_machine):
    m = make_machine("lab", 1 << 20, paused=True)
    recs = parse_bytes(save(m), Loader(m, False).describe)
    kinds = [type(r).__name__ for r in recs if not isinstance(r, (RamPage, RamZero))]
    assert kinds[:2] == ["Header", "Configuration"]
    sections = [(r.type_name, r.idstr, r.section_id) for r in recs if isinstance(r, SectionHeader)]
    assert sections == [("START", "ram", 2), ("PART", "ram", 2), ("END", "ram", 2),
                        ("FULL", "timer", 0), ("FULL", "globalstate", 4), ("FULL", "cpu", 5),
                        ("FULL", "serial", 6)]
    assert isinstance(recs[-1], End) and recs[-1].warning is None
    desc = json.loads(next(r for r in recs if isinstance(r, VMDesc)).json)
    cpu = next(d for d in desc["devices"] if d["name"] == "cpu")
    assert cpu["version"] == 2
    assert cpu["fields"][0] == {"name": "regs", "array_len": 16, "type": "uint64", "size": 8}
    assert "ram" not in [d["name"] for d in desc["devices"]]


def test_parser_is_incremental(make_machine):
    """Bytes fed one at a time give the same records as the whole stream at once."""
    from machine.savevm.records import Parser

    m = make_machine("lab", 64 << 10, paused=True)
    m.ram.write(0x2000, b"x" * 100)
    data = save(m)
    describe = Loader(m, False).describe
    whole = parse_bytes(data, describe)
    p = Parser(describe)
    got = []
    for i in range(len(data)):
        p.feed(data[i:i + 1])
        got.extend(p.records())
    p.feed_eof()
    got.extend(p.records())
    assert got == whole


def _broken(data, describe):
    with pytest.raises(StreamError) as e:
        parse_bytes(data, describe)
    return e.value.message


def test_structural_errors(make_machine):
    m = make_machine("none", 64 << 10, paused=True)
    data = save(m)
    describe = Loader(m, False).describe
    assert _broken(b"XXXX" + data[4:], describe) == "Not a migration stream"
    assert _broken(data[:4] + b"\0\0\0\x04" + data[8:], describe) == \
        "Unsupported migration stream version"
    assert _broken(data[:8] + b"\x01" + data[9:], describe) == "Configuration section missing"
    # The START footer is at 17 (header+config) + 17 (section header) + 28 (payload).
    foot = 17 + 17 + 28
    assert data[foot] == 0x7E
    assert _broken(data[:foot] + b"\x00" + data[foot + 1:], describe) == \
        "Missing section footer for ram"
    assert _broken(data[:foot + 1] + b"\0\0\0\x05" + data[foot + 5:], describe) == \
        "Mismatched section id in footer for ram - read 0x5 expected 0x2"
    part = foot + 5
    assert _broken(data[:part] + b"\x09" + data[part + 1:], describe) == \
        "Unknown savevm section type 9"
    assert _broken(data[:part + 1] + b"\0\0\0\x09" + data[part + 5:], describe) == \
        "Unknown savevm section 9"
    rec = part + 5
    bad_flags = struct.pack(">Q", 0x100)
    assert _broken(data[:rec] + bad_flags + data[rec + 8:], describe) == \
        "Unknown combination of migration flags: 0x100"
    assert "truncated" in _broken(data[:rec + 3], describe)


def test_missing_vmdesc_is_only_a_warning(make_machine):
    m = make_machine("none", 64 << 10, paused=True)
    data = save(m)
    eof = data.rindex(b"\x00\x06")  # EOF then VMDESCRIPTION
    recs = parse_bytes(data[:eof + 1], Loader(m, False).describe)
    assert isinstance(recs[-2], EOF)
    assert recs[-1].warning == "Expected vmdescription section, but got 0"
