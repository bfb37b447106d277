"""Trace events, named and printed as QEMU's "log" trace backend prints them.

QEMU writes ``NAME ARGS`` (for an event without arguments, ``NAME `` with the space); qmon
sends the lines to the monitor's output, so they appear above the prompt or in a transcript.
"""

from __future__ import annotations

import fnmatch

# name -> format of its arguments (QEMU's trace-events file), in the order QEMU lists them.
EVENTS = {
    "savevm_section_start": "{}, section_id {}",
    "savevm_section_end": "{}, section_id {} -> {}",
    "savevm_section_skip": "{}, section_id {}",
    "savevm_state_setup": "",
    "savevm_state_header": "",
    "savevm_state_iterate": "",
    "savevm_state_cleanup": "",
    "savevm_state_complete_precopy": "",
    "qemu_loadvm_state_section": "{}",
    "qemu_loadvm_state_section_partend": "{}",
    "qemu_loadvm_state_section_startfull": "{}({}) {} {}",
    "qemu_loadvm_state_post_main": "{}",
    "loadvm_state_setup": "",
    "loadvm_state_cleanup": "",
    "migration_bitmap_sync_start": "",
    "migration_bitmap_sync_end": "dirty_pages {}",
    "migrate_set_state": "new state {}",
    "migration_completion_file_err": "",
    "migration_throttle": "",
}


class TraceError(ValueError):
    pass


class Tracer:
    def __init__(self, output):
        self.output = output  # callable(str)
        self.enabled: set[str] = set()

    def set_state(self, pattern: str, on: bool):
        names = [n for n in EVENTS if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise TraceError(f'unknown event "{pattern}"')
        for n in names:
            if on:
                self.enabled.add(n)
            else:
                self.enabled.discard(n)

    def listing(self, pattern: str | None = None) -> list[str]:
        return [f"{n} : state {1 if n in self.enabled else 0}" for n in EVENTS
                if pattern is None or fnmatch.fnmatchcase(n, pattern)]

    def __call__(self, name: str, *args):
        if name in self.enabled:
            self.output(f"{name} {EVENTS[name].format(*args)}")
