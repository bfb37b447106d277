"""The snapshot store writes a new stream over the file of the snapshot a newer one replaced
(the spare): never when that file has another name, never through a symlink, and never failing
when the spare went away."""

import os

from machine.snapshots import SnapshotStore


def save(store, tag, payload: bytes):
    def write(fd):
        os.write(fd, payload)
        return len(payload)
    return store.save(tag, write, 0)


def stream_of(store, tag):
    return os.path.join(store.dir, store.find(tag).stream)


def test_the_replaced_file_is_written_over_and_given_back_at_close(tmp_path):
    store = SnapshotStore(str(tmp_path))
    save(store, "a", b"A" * 1000)
    first = os.stat(stream_of(store, "a")).st_ino
    save(store, "a", b"B" * 10)  # the first file becomes the spare
    save(store, "b", b"C" * 20)  # ... and b's stream is written over it
    assert os.stat(stream_of(store, "b")).st_ino == first
    assert open(stream_of(store, "b"), "rb").read() == b"C" * 20  # cut to its own length
    assert open(stream_of(store, "a"), "rb").read() == b"B" * 10
    save(store, "b", b"D" * 5)
    store.close()
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".vmstate"))
    assert names == sorted(os.path.basename(stream_of(store, t)) for t in ("a", "b"))


def test_a_hard_link_to_a_replaced_stream_keeps_its_bytes(tmp_path):
    store = SnapshotStore(str(tmp_path))
    save(store, "a", b"A" * 100)
    backup = tmp_path.parent / (tmp_path.name + "-backup.vmstate")
    os.link(stream_of(store, "a"), backup)
    save(store, "a", b"B" * 100)
    save(store, "c", b"C" * 100)
    assert backup.read_bytes() == b"A" * 100


def test_a_spare_linked_or_removed_after_it_was_kept_is_not_used(tmp_path):
    store = SnapshotStore(str(tmp_path))
    save(store, "a", b"A" * 100)
    save(store, "a", b"B" * 100)
    spare = os.path.join(str(tmp_path), store._spare[0])
    backup = tmp_path.parent / (tmp_path.name + "-late-backup.vmstate")
    os.link(spare, backup)
    save(store, "b", b"C" * 100)
    assert backup.read_bytes() == b"A" * 100
    save(store, "b", b"D" * 100)  # a new spare
    os.unlink(os.path.join(str(tmp_path), store._spare[0]))
    save(store, "c", b"E" * 100)  # the spare is gone: a new file, no error
    assert open(stream_of(store, "c"), "rb").read() == b"E" * 100
