"""MigrationState: status, counters, parameters and capabilities, as QEMU's migration.c keeps them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# QEMU 7.2's capability list, in its order (info migrate_capabilities prints them so).
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
)
IMPLEMENTED_CAPABILITIES = {"xbzrle", "auto-converge", "events", "pause-before-switchover",
                            "return-path"}

# The parameters qmon implements, in the order QEMU prints them, with their defaults.
PARAMETER_DEFAULTS = {
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "max-bandwidth": 128 << 20,  # bytes/s
    "downtime-limit": 300,  # ms
    "xbzrle-cache-size": 64 << 20,  # bytes
    # qmon's: 3 (QEMU's streaming format) or 2 (the old container, which must seek).
    "x-stream-version": 3,
}
# Everything QEMU 7.2 lists, so a real but unimplemented name gets a clear answer.
ALL_PARAMETERS = (
    "announce-initial", "announce-max", "announce-rounds", "announce-step", "compress-level",
    "compress-threads", "compress-wait-thread", "decompress-threads",
    "throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
    "cpu-throttle-tailslow", "max-cpu-throttle", "tls-creds", "tls-hostname", "max-bandwidth",
    "downtime-limit", "x-checkpoint-delay", "block-incremental", "multifd-channels",
    "multifd-compression", "xbzrle-cache-size", "max-postcopy-bandwidth", "tls-authz",
)
SIZE_PARAMETERS = {"max-bandwidth", "xbzrle-cache-size"}
PERCENT_PARAMETERS = {"throttle-trigger-threshold", "cpu-throttle-initial",
                      "cpu-throttle-increment", "max-cpu-throttle"}

# Statuses (QEMU's MigrationStatus names).
NONE, SETUP, ACTIVE, CANCELLING, CANCELLED, COMPLETED, FAILED = (
    "none", "setup", "active", "cancelling", "cancelled", "completed", "failed")
PRE_SWITCHOVER, DEVICE = "pre-switchover", "device"
FINISHED = {CANCELLED, COMPLETED, FAILED}


def now_ms() -> float:
    return time.monotonic() * 1000


@dataclass
class PassRecord:
    """One pass (a dirty sync period) of a migration: the teaching history."""
    number: int
    start_ms: float
    duration_ms: float = 0.0
    pages: int = 0
    zero_pages: int = 0
    dirtied: int = 0
    bandwidth: float = 0.0  # bytes/ms measured over the pass
    expected_downtime_ms: float = 0.0
    pending_bytes: int = 0  # dirty bytes left when the pass ended


@dataclass
class MigrationState:
    status: str = NONE
    error: str | None = None
    start_ms: float = 0.0
    setup_ms: float = 0.0
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    mbps: float = 0.0
    pages_per_second: float = 0.0
    dirty_pages_rate: int = 0
    transferred: int = 0  # ram section bytes
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_sync_count: int = 0
    xbzrle: dict | None = None
    disk: dict | None = None  # block migration (migrate -b): transferred, remaining, total
    passes: list = field(default_factory=list)
    current_pass: PassRecord | None = None  # the pass under way, for info migrate_passes
    # Set for a listening destination: the addresses 'info migrate' shows.
    socket_addresses: list = field(default_factory=list)
