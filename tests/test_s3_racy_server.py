"""A server whose conditional writes are check-then-act (FORMAT §3a): moto's are, and SeaweedFS was seen to let two
racing `If-None-Match` creates both succeed. Two conditional puts on one version can then both go in, the one that
lands last winning. Each race is driven deterministically through `FaultyBackend.check_then_put`: the condition is
checked, another saver runs in the window, then the write lands. Whatever lands last, the saves end with every
entry in the manifest, the gc root naming exactly the final manifest, under the scope.id in force."""
from __future__ import annotations

import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

pytest.importorskip("obstore")

from cas_helpers import ENV_KEY, random_tree, read_tree, write_tree
from s3_servers import S3Bucket

from cas import BlobStore, Scope, layout, load_tree, save_tree
from cas.faulty import FaultyBackend, Hook
from cas.roots import read_root
from cas.scope import read_scope_id

WAIT_S = 60  # a step the test waits for: far longer than a save on moto takes; a missed step fails, never hangs


class Saver:
    """One saver's own view of the bucket (its own backends, as another pod has), each behind a FaultyBackend."""

    def __init__(self, bucket: S3Bucket, src: Path, files: dict[str, bytes], *, store_hook: Hook | None = None,
                 scope_hook: Hook | None = None):
        self.src, self.files = src, files
        write_tree(src, files)
        self.store_backend = FaultyBackend(bucket.backend("org/b10_cas"), before=store_hook)
        self.scope_backend = FaultyBackend(bucket.backend("model/compile_cache"), before=scope_hook)

    def save(self) -> None:
        res = save_tree(self.src, BlobStore(self.store_backend, create=True), Scope(self.scope_backend, create=True),
                        ENV_KEY, threads=4)
        assert res.manifest_written


def tree(seed: int, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{rel}": data for rel, data in random_tree(random.Random(seed), 12, max_size=3000).items()}


def when(verb: str, key_prefix: str, action) -> Hook:
    """A hook that runs `action` once, before the first `verb` on a key starting with `key_prefix`."""
    done = threading.Event()

    def hook(v: str, key: str) -> None:
        if v == verb and key.startswith(key_prefix) and not done.is_set():
            done.set()
            action()
    return hook


def wait(event: threading.Event) -> None:
    assert event.wait(WAIT_S), "a step of the race never came"


def assert_settled(bucket: S3Bucket, tmp_path: Path, union: dict[str, bytes]) -> None:
    store = BlobStore(bucket.backend("org/b10_cas"))
    scope = Scope(bucket.backend("model/compile_cache"))
    data = scope.read_manifest_bytes(ENV_KEY)
    assert data is not None
    scope_id = read_scope_id(scope.backend)
    assert scope_id is not None
    root = read_root(store, layout.root(scope_id, ENV_KEY))
    assert root.manifest == blake3.blake3(data).hexdigest()  # the root under the id in force names the final one
    loaded = load_tree(tmp_path / "dst", store, scope, ENV_KEY, threads=4)
    assert not loaded.misses
    assert {rel: body for rel, (body, _mode) in read_tree(tmp_path / "dst").items()} == union


def test_a_root_write_that_lands_after_a_later_savers_is_corrected(moto_bucket: S3Bucket, tmp_path: Path) -> None:
    """A commits, its root put passes its condition, and B saves from start to end (its own root put passes the same
    condition) before A's lands: the root names A's manifest, which B's already replaced. A's confirmation finds the
    newer manifest and points the root at it."""
    base = Saver(moto_bucket, tmp_path / "base", tree(1, "base"))
    base.save()  # scope.id and a root exist: both later savers read the same root version in their first wave
    b = Saver(moto_bucket, tmp_path / "b", {**base.files, **tree(3, "b")})
    a = Saver(moto_bucket, tmp_path / "a", {**base.files, **tree(2, "a")})
    a.store_backend.check_then_put("roots/", between=lambda _key: b.save())
    a.save()
    assert_settled(moto_bucket, tmp_path, {**a.files, **b.files})


def test_a_manifest_put_that_lands_over_a_newer_one_loses_no_entry(moto_bucket: S3Bucket, tmp_path: Path) -> None:
    """A's compare-and-swap passes its check; B's passes on the same version and goes in; then A's lands over it,
    without B's entries. B's confirmation sees a manifest lacking its paths and merges them in again."""
    base = Saver(moto_bucket, tmp_path / "base", tree(1, "base"))
    base.save()
    b_committed, a_landed = threading.Event(), threading.Event()
    b_verbs: list[str] = []

    def b_hook(verb: str, key: str) -> None:  # B's first look at the manifest after its own put: its confirmation
        if key != layout.manifest(ENV_KEY) or b_committed.is_set():
            return
        b_verbs.append(verb)
        if verb != "put" and "put" in b_verbs:
            b_committed.set()
            wait(a_landed)

    b = Saver(moto_bucket, tmp_path / "b", {**base.files, **tree(3, "b")}, scope_hook=b_hook)
    a = Saver(moto_bucket, tmp_path / "a", {**base.files, **tree(2, "a")},  # A's confirmation: its put landed
              scope_hook=when("stat", layout.manifest(ENV_KEY), a_landed.set))
    with ThreadPoolExecutor(1) as pool:
        b_run: list[Future[None]] = []

        def b_in_the_window(_key: str) -> None:
            b_run.append(pool.submit(b.save))
            wait(b_committed)

        a.scope_backend.check_then_put(layout.manifest(ENV_KEY), between=b_in_the_window)
        a.save()
        assert b_run, "A's compare-and-swap never ran"
        b_run[0].result(timeout=WAIT_S)
    assert b_verbs.count("put") == 1  # B's compare-and-swap went in once before A's landed over it
    assert_settled(moto_bucket, tmp_path, {**a.files, **b.files})


def test_two_scope_id_creates_that_both_succeed_end_under_the_one_in_force(moto_bucket: S3Bucket,
                                                                           tmp_path: Path) -> None:
    """A new deployment: B's create of scope.id passes its check; A creates its own, and B's lands over it. B commits
    first, A last: A's root goes under A's id, which is no longer the deployment's. A's confirmation reads scope.id,
    adopts B's id and points the root there."""
    a_at_commit, b_committed = threading.Event(), threading.Event()

    def a_commits() -> None:  # A's manifest put: its scope.id create went in before it
        a_at_commit.set()
        wait(b_committed)

    a = Saver(moto_bucket, tmp_path / "a", tree(2, "a"), scope_hook=when("put", layout.manifest(ENV_KEY), a_commits))
    b = Saver(moto_bucket, tmp_path / "b", tree(3, "b"), store_hook=when("put", "roots/", b_committed.set))
    with ThreadPoolExecutor(1) as pool:
        a_run: list[Future[None]] = []

        def a_in_the_window(_key: str) -> None:
            a_run.append(pool.submit(a.save))
            wait(a_at_commit)

        b.scope_backend.check_then_put(layout.SCOPE_ID, between=a_in_the_window)
        b.save()
        assert a_run, "B's create of scope.id never ran"
        a_run[0].result(timeout=WAIT_S)
    assert_settled(moto_bucket, tmp_path, {**a.files, **b.files})


def test_a_root_written_alongside_a_losing_commit_is_a_sibling_not_a_clone(moto_bucket: S3Bucket,
                                                                           tmp_path: Path) -> None:
    """A's root goes in alongside its compare-and-swap, which loses to B's (B saved from start to end in the root
    put's window), and A dies before its retry: the root names a manifest that never was. The next save audits,
    keeps scope.id (the root's manifest was merged into the same version as the current one: a sibling, not a
    clone's) and points the root at the manifest."""
    from cas.errors import CasError, StoreUnavailable

    base = Saver(moto_bucket, tmp_path / "base", tree(1, "base"))
    base.save()
    scope_id = read_scope_id(moto_bucket.backend("model/compile_cache"))
    b_done = threading.Event()
    a = Saver(moto_bucket, tmp_path / "a", {**base.files, **tree(2, "a")},
              scope_hook=when("put", layout.manifest(ENV_KEY), lambda: wait(b_done)))
    b = Saver(moto_bucket, tmp_path / "b", {**base.files, **tree(3, "b")})

    def b_in_the_window(_key: str) -> None:
        b.save()
        a.scope_backend.fail("get", "manifests/", StoreUnavailable("A dies before its retry"))
        b_done.set()

    a.store_backend.check_then_put("roots/", between=b_in_the_window)
    with pytest.raises(CasError):
        a.save()
    store = BlobStore(moto_bucket.backend("org/b10_cas"))
    scope = Scope(moto_bucket.backend("model/compile_cache"))
    data = scope.read_manifest_bytes(ENV_KEY)
    assert data is not None
    assert read_root(store, layout.root(scope_id, ENV_KEY)).manifest != blake3.blake3(data).hexdigest()  # stale

    c = Saver(moto_bucket, tmp_path / "c", {**base.files, **b.files, **tree(4, "c")})
    c.save()
    assert read_scope_id(moto_bucket.backend("model/compile_cache")) == scope_id  # not taken for a clone
    assert_settled(moto_bucket, tmp_path, {**base.files, **b.files, **c.files})


def test_a_create_retried_after_it_went_in_is_still_this_savers(moto_bucket: S3Bucket) -> None:
    """A client that retries a create whose first attempt went in (its answer lost to a 5xx or a reset) is told it
    exists: the id read back is this saver's own, so the save still knows no root exists under it (its root put goes
    with the compare-and-swap)."""
    from cas.storage import AlreadyExists, Payload

    class LandsThenExists(FaultyBackend):
        def put(self, key: str, data: Payload, *, if_absent: bool = False, if_version: str | None = None):
            if key == layout.SCOPE_ID:
                self.inner.put(key, data)
                raise AlreadyExists(key)
            return super().put(key, data, if_absent=if_absent, if_version=if_version)

    scope = Scope(LandsThenExists(moto_bucket.backend("model/compile_cache")), create=True)
    assert scope.existing_scope_id() is None
    assert scope.create_scope_id()
    assert scope.scope_id == read_scope_id(moto_bucket.backend("model/compile_cache"))

    other = Scope(FaultyBackend(moto_bucket.backend("model/compile_cache")))  # a second creator, told it exists
    assert not other.create_scope_id() and other.scope_id == scope.scope_id  # the first one's id: not its own
