"""savevm, loadvm, delvm, info snapshots."""

from __future__ import annotations

from .. import render
from . import INFO, CommandError, command


@command("savevm", "name:s?", "tag",
         "save the machine as a snapshot (no tag: vm-DATE); an existing tag is replaced",
         completion="tag")
def savevm(session, name=None):
    m = session.machine
    m.run(m.save_snapshot, session.store, name)


@command("loadvm", "name:s", "tag", "restore the machine from a snapshot", completion="tag")
def loadvm(session, name):
    m = session.machine
    m.run(m.load_snapshot, session.store, name)


@command("delvm", "name:s", "tag", "delete a snapshot", completion="tag")
def delvm(session, name):
    m = session.machine
    m.run(m.delete_snapshot, session.store, name)


@command("snapshots", help="list the saved snapshots", table=INFO)
def info_snapshots(session):
    from machine.snapshots import SnapshotError

    try:
        infos = session.store.list()
    except SnapshotError as e:
        raise CommandError(str(e)) from None
    for line in render.snapshots(infos):
        session.out(line)
