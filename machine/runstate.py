"""QEMU's run states and the transitions it allows between them (softmmu/runstate.c)."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


S = RunState
_TRANSITIONS = {
    S.PRELAUNCH: {S.INMIGRATE, S.RUNNING, S.FINISH_MIGRATE},
    S.DEBUG: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH},
    S.INMIGRATE: {S.INTERNAL_ERROR, S.IO_ERROR, S.PAUSED, S.RUNNING, S.SHUTDOWN, S.SUSPENDED,
                  S.WATCHDOG, S.GUEST_PANICKED, S.PRELAUNCH, S.POSTMIGRATE, S.FINISH_MIGRATE,
                  S.COLO},
    S.INTERNAL_ERROR: {S.PAUSED, S.FINISH_MIGRATE, S.PRELAUNCH},
    S.IO_ERROR: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH},
    S.PAUSED: {S.RUNNING, S.FINISH_MIGRATE, S.POSTMIGRATE, S.PRELAUNCH, S.COLO},
    S.POSTMIGRATE: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH},
    S.FINISH_MIGRATE: {S.RUNNING, S.PAUSED, S.POSTMIGRATE, S.PRELAUNCH, S.COLO,
                       S.INTERNAL_ERROR, S.IO_ERROR, S.SHUTDOWN, S.SUSPENDED, S.WATCHDOG,
                       S.GUEST_PANICKED},
    S.RESTORE_VM: {S.RUNNING, S.PRELAUNCH},
    S.COLO: {S.RUNNING, S.PRELAUNCH, S.SHUTDOWN},
    S.RUNNING: {S.DEBUG, S.INTERNAL_ERROR, S.IO_ERROR, S.PAUSED, S.FINISH_MIGRATE,
                S.RESTORE_VM, S.SAVE_VM, S.SHUTDOWN, S.WATCHDOG, S.GUEST_PANICKED, S.COLO},
    S.SAVE_VM: {S.RUNNING, S.SUSPENDED},
    S.SHUTDOWN: {S.PAUSED, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO},
    S.SUSPENDED: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO},
    S.WATCHDOG: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH, S.COLO},
    S.GUEST_PANICKED: {S.RUNNING, S.FINISH_MIGRATE, S.PRELAUNCH},
}

# States from which only a reset gets the guest going again (runstate_needs_reset()).
NEEDS_RESET = {S.INTERNAL_ERROR, S.SHUTDOWN, S.GUEST_PANICKED}


class RunStateError(Exception):
    pass


def check_transition(old: RunState, new: RunState) -> None:
    if old != new and new not in _TRANSITIONS.get(old, ()):
        raise RunStateError(f"invalid runstate transition: '{old.value}' -> '{new.value}'")


def status_text(state: RunState) -> str:
    """`info status`: plain paused and running are bare; every other state is a paused one."""
    if state == S.RUNNING:
        return "running"
    if state == S.PAUSED:
        return "paused"
    return f"paused ({state.value})"
