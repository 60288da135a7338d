"""Every timing constant of the store, with why it has its value, and the relations between them (FORMAT §1-§6).

The safety of gc rests on inequalities between these numbers (a blob a save relies on stays younger than gc's
grace; a lock gc sweeps has no live holder), so they live in one place and `check_relations` asserts those
inequalities. gc runs it at start-up (with the store's own freshen_after and the run's grace and root TTL), and the
tests import it, so a change to one constant that breaks a relation fails loudly instead of silently losing data.
All durations are seconds.
"""
from __future__ import annotations

from .errors import CasError

# -- blobs -----------------------------------------------------------------------------------------------------------
# Writers freshen a relied-upon blob at most once an hour (FORMAT §2): one touch per blob per hour, and a blob a save
# relies on is then never older than this. A store records its own value in CAS-FORMAT; this is the default.
DEFAULT_FRESHEN_AFTER = 3600
# gc's grace must leave a blob room to be one freshen_after old when a save finds it, plus the save's own duration;
# at 2 x freshen_after a save has one freshen_after to commit (FORMAT §5's inequality).
MIN_GRACE_FACTOR = 2
# Default grace: the 1 h freshen_after plus 5 h during which a save may sit between checking a blob and committing
# its root. A real save takes seconds; hours cover a suspended or throttled pod.
DEFAULT_GRACE = 6 * 3600
# Quarantined blobs are evidence for an operator, not data: a week is time enough to look at them.
QUARANTINE_EXPIRY = 7 * 24 * 3600

# -- roots -------------------------------------------------------------------------------------------------------------
# Loads and saves refresh a root at most hourly: enough resolution for a 30-day TTL, one touch per pod-hour.
ROOT_REFRESH = 3600
# A deployment unused for a month is gone (scaled to zero for good, or replaced): its root dies and its blobs become
# garbage. Long against every other period here, so a paused deployment keeps its cache over a long weekend.
DEFAULT_ROOT_TTL = 30 * 24 * 3600

# -- temp files --------------------------------------------------------------------------------------------------------
# A temp file older than an hour has no live writer: the largest write (a 64 GiB blob at 100 MB/s) takes minutes, and
# every writer renames or deletes its temp file when it finishes (FORMAT §1).
TEMP_EXPIRY = 3600

# -- locks and save slots (FORMAT §6) -------------------------------------------------------------------------------
# A lock's default stale_after (scope.lock, save_tree, acquire_slot): a manifest lock is held for a commit, seconds.
DEFAULT_STALE_AFTER = 30.0
# The largest stale_after any caller may give a lock or slot: b10_transfer caps CLEANUP_LOCK_TIMEOUT_SECONDS here
# (b10_transfer/config.py LOCK_TIMEOUT_CAP_S), so a dead holder blocks others for at most an hour.
MAX_STALE_AFTER = 3600
# A long-held lock (a save slot, the gc lock) is refreshed this many times per stale_after, so a waiter never sees a
# live holder's lock unchanged for stale_after even when one or two refreshes are late.
HEARTBEATS_PER_STALE = 3
# gc removes a lock file (locks/, manifests/*.lock, slots/*.lock) untouched for this long by the server's clock. It
# must exceed the longest stale_after with margin: a live slot is refreshed every stale_after / 3 (up to 20 min at the
# cap), and a lock whose holder is alive but slow must be broken by its waiters' own rule, never by gc first. Two
# hours: the cap plus an hour. (It was 600 s, shorter than a slot's heartbeat at the cap: gc could sweep a live slot.)
LOCK_EXPIRY = 2 * MAX_STALE_AFTER
# The gc lock goes stale after a minute without refresh: a dead collector blocks the next one for a minute.
GC_LOCK_STALE = 60.0
# A second collector waits this long for the first by default: a collection of a large store takes minutes.
DEFAULT_LOCK_WAIT = 120.0
# A manifest lock waiter gives up after this long (scope.lock): a commit takes seconds.
MANIFEST_LOCK_TIMEOUT = 60.0

# -- check ------------------------------------------------------------------------------------------------------------
# A save renames its manifest, then writes the root, seconds apart; a local manifest older than this whose root does
# not name it was left by a save that died in between, or lost its root to gc.
UNROOTED_AGE = 300


class TimingError(CasError):
    """The timing constants (or a run's settings) break a relation gc's safety argument needs."""


def heartbeat_interval(stale_after: float) -> float:
    """How often the holder of a long-held lock refreshes it (FORMAT §6)."""
    return stale_after / HEARTBEATS_PER_STALE


def check_relations(freshen_after: float = DEFAULT_FRESHEN_AFTER, grace: float = DEFAULT_GRACE,
                    root_ttl: float = DEFAULT_ROOT_TTL, max_stale_after: float = MAX_STALE_AFTER) -> None:
    """Raise TimingError naming the first relation that does not hold. Defaults check the constants themselves."""
    relations = [
        (grace >= MIN_GRACE_FACTOR * freshen_after,
         f"grace period {grace:g}s is shorter than {MIN_GRACE_FACTOR} x freshen_after ({freshen_after:g}s): a blob "
         f"a save relies on could be collected before the save commits; use --grace "
         f"{MIN_GRACE_FACTOR * freshen_after:g} or more"),
        (root_ttl > grace, f"root TTL {root_ttl:g}s must be longer than the grace period {grace:g}s"),
        (root_ttl > 2 * ROOT_REFRESH,
         f"root TTL {root_ttl:g}s must exceed twice ROOT_REFRESH ({ROOT_REFRESH}s): a root in use is refreshed only "
         f"that often"),
        (LOCK_EXPIRY > max_stale_after + heartbeat_interval(max_stale_after),
         f"LOCK_EXPIRY {LOCK_EXPIRY}s must exceed the longest lock stale_after ({max_stale_after:g}s) plus a "
         f"heartbeat: gc could sweep a live save slot"),
        (GC_LOCK_STALE > heartbeat_interval(GC_LOCK_STALE) * 2,
         "the gc lock must be refreshed at least twice per GC_LOCK_STALE"),
        (TEMP_EXPIRY > GC_LOCK_STALE, "TEMP_EXPIRY must be far longer than any single write"),
        (DEFAULT_STALE_AFTER <= max_stale_after, "DEFAULT_STALE_AFTER must not exceed MAX_STALE_AFTER"),
        (QUARANTINE_EXPIRY > DEFAULT_GRACE, "quarantine evidence must outlive a default grace period"),
    ]
    for holds, why in relations:
        if not holds:
            raise TimingError(why)
