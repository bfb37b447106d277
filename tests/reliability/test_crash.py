"""Crashes: kill -9 of qmon at random moments during savevm and delvm.

Every trial runs one real qmon process on a snapshot directory shared by all trials. The process
first checks what the previous (killed) process left: its snapshot store cleaned up the dead
writer's leftovers at open, ``info snapshots`` lists exactly the snapshots whose metadata was
committed (each with a complete stream), every one of them loads and passes the counter workload's
invariant, and the snapshots that were not the target of the killed command are byte for byte
what they were. Then it issues ``savevm TAG`` (a new tag or a replacement) or ``delvm TAG`` and is
sent SIGKILL after a random delay spread over the command's measured duration. What the directory
holds right after the kill says where the kill landed (before the command wrote anything, during
it, or after it). A last fresh process checks what the last kill left.

The quick test runs a few trials of each; the slow ones (``-m slow``) at least 50 per command.
Set QMON_CRASH_SEED to replay a run's choices (the kill moments depend on timing and are not
replayable exactly).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import signal
import statistics
import time
from collections import Counter

import pytest

from conftest import QmonProc
from machine.snapshots import _encode

RAM = "32M"
WORKLOAD = "counter,speed=20000"
KEEP = "keep"  # never the target of a killed command: must survive every trial untouched
# plain tags, one whose file name is %-encoded, one long enough that its file name is hashed
TARGETS = ["t0", "t1", "d\u00e9j\u00e0-vu", "long-" + "x" * 190]

_TMP = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}\.(vmstate|json)$")
_STREAM = re.compile(r"^([A-Za-z0-9_%~-]+)\.(\d+)-[0-9a-f]{8}\.vmstate$")


# The snapshot directory as the files say ---------------------------------------------------------
def read_dir(d):
    """{tag: metadata} for the committed snapshots (metadata readable and its stream present),
    plus the list of every file name."""
    names = sorted(os.listdir(d))
    metas = {}
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        with open(os.path.join(d, name), encoding="utf-8") as f:
            meta = json.load(f)  # our tags are plain: <tag>.json
        assert name == _encode(meta["tag"]) + ".json", name
        if meta["stream"] in names:
            metas[meta["tag"]] = meta
    return metas, names


def leftovers(d):
    """Files of a writer that are not part of a committed snapshot."""
    metas, names = read_dir(d)
    referenced = {m["stream"] for m in metas.values()}
    return [n for n in names
            if _TMP.match(n) or (_STREAM.match(n) and n not in referenced)]


def file_hash(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def listed_tags(lines):
    if lines == ["There is no snapshot available."]:
        return []
    assert lines[0] == "List of snapshots present on all disks:", lines
    return [row.split()[1] for row in lines[2:]]


# The run -----------------------------------------------------------------------------------------
class CrashRun:
    def __init__(self, snapdir, seed):
        self.dir = snapdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.procs: list[QmonProc] = []
        self.hashes: dict[str, str] = {}  # stream file name -> hash when first seen
        self.duration: dict[str, float] = {}
        self.trials = Counter()          # op -> trials
        self.phases = Counter()          # (op, phase) -> kills
        self.where = Counter()           # (op, detail) -> kills, finer than phase
        self.verified = 0                # loadvm + invariant checks passed
        self.untouched = 0               # earlier, non-target snapshots found byte-identical
        self.left = 0                    # leftovers found right after kills
        self.cleaned = 0                 # of those, removed by the next qmon's store at open
        self.replacing = 0               # savevm trials whose tag already existed
        self.landed = {"savevm": [], "delvm": []}  # (delay, phase) of every kill

    # Processes ----------------------------------------------------------------------------------
    def start(self):
        p = QmonProc(["-m", RAM, "-workload", WORKLOAD, "-snapshot-dir", self.dir])
        self.procs.append(p)
        return p

    def cmd_ok(self, p, line):
        out = p.cmd(line)
        assert out == [], f"{line!r}: {out}"

    def no_traceback(self, p):
        text = "\n".join(l for l in p.seen + p.stderr_lines if l is not None)
        assert "Traceback" not in text, text
        assert "internal error" not in text, text

    def close_all(self):
        for p in self.procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()

    # Setup: a base of snapshots, and how long the commands take ------------------------------
    def setup(self):
        p = self.start()
        # let the counter write every page once, so a save writes all of RAM, not zero pages
        p.wait_for("info workload",
                   lambda out: not any(l.startswith("progress: lap 0,") for l in out), timeout=30)
        times = {"savevm": [], "delvm": []}
        for tag in [KEEP] + TARGETS[:2]:
            self.cmd_ok(p, f"savevm {tag}")
        for _ in range(3):
            for op in ("savevm", "delvm"):
                t = time.perf_counter()
                self.cmd_ok(p, f"{op} calibrate")
                times[op].append(time.perf_counter() - t)
        self.duration = {op: statistics.median(v) for op, v in times.items()}
        p.close()
        self.no_traceback(p)
        for tag, meta in read_dir(self.dir)[0].items():
            self.hashes[meta["stream"]] = file_hash(os.path.join(self.dir, meta["stream"]))

    # After a kill: a fresh qmon on the directory ---------------------------------------------
    def check_fresh(self, p, expected, previous, target):
        """``expected``: {tag: metadata} committed when the last process died; ``previous``: the
        same before its command; ``target``: the tag that command was about."""
        p.cmd("info status")  # answered: the store was opened (and cleaned) before the monitor
        left = leftovers(self.dir)
        assert left == [], f"leftovers of the killed writer still there: {left}"
        metas, names = read_dir(self.dir)
        assert metas == expected, "the committed snapshots changed when a qmon started"
        tags = listed_tags(p.cmd("info snapshots"))
        assert sorted(tags) == sorted(expected), (tags, sorted(expected), names)
        for tag in tags:
            stream = os.path.join(self.dir, metas[tag]["stream"])
            # complete: exactly the size the save recorded
            assert os.path.getsize(stream) == metas[tag]["vm_state_size"], tag
            if tag != target and tag in previous:
                # an earlier snapshot that was not the target: the same file, the same bytes
                assert previous[tag] == metas[tag], tag
                assert file_hash(stream) == self.hashes[metas[tag]["stream"]], tag
                self.untouched += 1
            self.hashes.setdefault(metas[tag]["stream"], file_hash(stream))
        for tag in self.rng.sample(tags, len(tags)):
            self.cmd_ok(p, f"loadvm {tag}")
            out = p.cmd("info workload")
            assert out[-1] == "invariant: ok", (tag, out)
            self.verified += 1
        assert KEEP in tags

    def kill_delay(self, op):
        """Half the kills anywhere from before the command starts to a little after it ends;
        the other half near the edges of where earlier kills found the files half written
        (the first and last steps of a save, and delvm's window between its two unlinks, are
        narrow; timing noise spreads the kills around the edges)."""
        dur = self.duration[op]
        whole = self.rng.uniform(0, 1.3 * dur)
        landed = self.landed[op]
        if len(landed) < 4 or self.rng.random() < 0.5:
            return whole
        early = [d for d, phase in landed if phase == "before"]
        mid = [d for d, phase in landed if phase == "mid"]
        late = [d for d, phase in landed if phase in ("done", "after")]
        if mid:
            edges = [(max([d for d in early if d < min(mid)], default=0.0), min(mid)),
                     (max(mid), min([d for d in late if d > max(mid)], default=1.3 * dur))]
        else:
            edges = [(max(early, default=0.0), min(late, default=1.3 * dur))]
        lo, hi = sorted(self.rng.choice(edges))
        return max(0.0, self.rng.uniform(lo - 0.05 * dur, hi + 0.05 * dur))

    # One killed command ------------------------------------------------------------------------
    def kill_during(self, p, op):
        metas, _ = read_dir(self.dir)
        if op == "savevm":
            target = self.rng.choice(TARGETS)
            replace = self.rng.random() < 0.5  # half the saves replace a snapshot of that tag
            if replace and target not in metas:
                self.cmd_ok(p, f"savevm {target}")
            elif not replace and target in metas:
                self.cmd_ok(p, f"delvm {target}")
            self.replacing += replace
        else:
            # at least two snapshots besides KEEP, one of them the target
            for tag in self.rng.sample(TARGETS, len(TARGETS)):
                if sum(t in metas for t in TARGETS) >= 2:
                    break
                if tag not in metas:
                    self.cmd_ok(p, f"savevm {tag}")
                    metas, _ = read_dir(self.dir)
            target = self.rng.choice([t for t in TARGETS if t in metas])
        metas, _ = read_dir(self.dir)
        before = dict(metas)
        for meta in before.values():
            if meta["stream"] not in self.hashes:
                self.hashes[meta["stream"]] = file_hash(os.path.join(self.dir, meta["stream"]))
        line = f"{op} {target}"
        delay = self.kill_delay(op)
        pid = p.proc.pid
        p.proc.stdin.write(line + "\n\n")
        p.proc.stdin.flush()
        end = time.perf_counter() + delay
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(left, 0.001))
        os.kill(pid, signal.SIGKILL)
        p.proc.wait()
        # what it printed until it died: its echo of the command, then the echo of the empty line
        # once the command was done
        out = []
        while (got := p.lines.get(timeout=10)) is not None:
            out.append(got)
            p.seen.append(got)
        replied = f"(qemu) {line}" in out and out[-1] == "(qemu) " and \
            out.index(f"(qemu) {line}") < len(out) - 1
        self.no_traceback(p)
        after, names = read_dir(self.dir)
        left = leftovers(self.dir)
        self.left += len(left)
        ours = [n for n in names if (m := _TMP.match(n) or _STREAM.match(n)) and
                int(m.group(1) if n.startswith(".tmp-") else m.group(2)) == pid]

        # the tags other than the target are untouched, whatever moment the kill hit
        assert {t: m for t, m in after.items() if t != target} == \
            {t: m for t, m in before.items() if t != target}, (line, names)
        if op == "savevm":
            new = after.get(target)
            committed = new is not None and new != before.get(target)
            if committed:
                assert _STREAM.match(new["stream"]).group(2) == str(pid)
                old = before.get(target)
                if old is not None and old["stream"] in names:
                    detail = "committed, old stream not yet removed"
                elif not replied:
                    detail = "committed, no reply yet"
                else:
                    detail = "after"
            else:
                # not committed: the target is what it was, or still absent
                assert after.get(target) == before.get(target), (line, names)
                if any(n.endswith(".vmstate") and n.startswith(".tmp-") for n in ours):
                    detail = "writing stream"
                elif any(n.endswith(".json") and n.startswith(".tmp-") for n in ours):
                    detail = "writing metadata"
                elif any(_STREAM.match(n) for n in ours):
                    detail = "stream renamed, metadata not yet"
                else:
                    assert not replied
                    detail = "before"
        else:
            assert not replied or target not in after
            if target in after:
                assert after[target] == before[target]
                detail = "before"
            elif before[target]["stream"] in names:
                detail = "metadata removed, stream not yet"
            elif not replied:
                detail = "removed, no reply yet"
            else:
                detail = "after"
        phase = {"before": "before", "after": "after", "committed, no reply yet": "done",
                 "removed, no reply yet": "done"}.get(detail, "mid")
        self.trials[op] += 1
        self.phases[op, phase] += 1
        self.landed[op].append((delay, phase))
        self.where[op, detail] += 1
        return after, before, target, len(left)

    # The trials --------------------------------------------------------------------------------
    def run(self, ops):
        self.setup()
        state = read_dir(self.dir)[0]
        previous, target, left = state, None, 0
        for op in ops:
            p = self.start()
            self.check_fresh(p, state, previous, target)
            self.cleaned += left
            state, previous, target, left = self.kill_during(p, op)
        p = self.start()
        self.check_fresh(p, state, previous, target)
        self.cleaned += left
        assert p.close() == 0
        self.no_traceback(p)

    def figures(self, name, elapsed):
        parts = []
        for op in ("savevm", "delvm"):
            if self.trials[op]:
                parts.append(
                    f"{op}: {self.trials[op]} trials (~{self.duration[op] * 1000:.0f} ms each), "
                    f"kills before/mid-write/written-unreplied/after "
                    f"{self.phases[op, 'before']}/{self.phases[op, 'mid']}/"
                    f"{self.phases[op, 'done']}/{self.phases[op, 'after']}")
        line = (f"[{name}] seed {self.seed}; " + "; ".join(parts) +
                (f"; {self.replacing} of the saves replacing" if self.trials["savevm"] else "") +
                f"; {self.verified} snapshots loaded with "
                f"invariant ok; {self.untouched} earlier snapshots byte-identical; "
                f"{self.cleaned}/{self.left} leftovers cleaned; {elapsed:.1f} s")
        detail = ", ".join(f"{op} {d}: {n}" for (op, d), n in sorted(self.where.items()))
        return line + "\n  where the kills landed: " + detail


def crash_trials(snapdir, ops, name, min_during):
    seed = int(os.environ.get("QMON_CRASH_SEED", random.randrange(1 << 32)))
    run = CrashRun(snapdir, seed)
    t = time.monotonic()
    try:
        run.run(ops)
    except BaseException as e:
        e.add_note(f"QMON_CRASH_SEED={seed}") if hasattr(e, "add_note") else None
        raise
    finally:
        run.close_all()
    print("\n" + run.figures(name, time.monotonic() - t))
    assert run.left == run.cleaned
    for op, n in min_during.items():
        assert run.phases[op, "mid"] >= n, run.figures(name, 0)
    return run


def test_kill_during_savevm_and_delvm_quick(snapdir):
    ops = ["savevm", "delvm"] * 6
    # Six kills need not land mid-write (they did not in one CI run: all after); the slow
    # tests, with 60 trials each, require it. This one checks the outcomes, wherever they land.
    crash_trials(snapdir, ops, "quick", {})


@pytest.mark.slow
@pytest.mark.parametrize("op", ["savevm", "delvm"])
def test_kill_during_savevm_or_delvm_slow(snapdir, op):
    crash_trials(snapdir, [op] * 60, f"slow {op}", {op: {"savevm": 15, "delvm": 5}[op]})
