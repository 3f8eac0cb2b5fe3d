"""Sharding: which watcher owns a run, and what a StatefulSet pod's hostname says."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from watcher.sharding import Shard, _jump, hostname_ordinal, shard_of

RUN_IDS = [f"run{i:05d}" for i in range(10_000)]


@pytest.mark.parametrize(
    ("key", "buckets", "bucket"),
    [
        # Vectors published with other implementations of the same algorithm.
        (10863919174838991, 11, 6),
        (2016238256797177309, 11, 3),
        (1673758223894951030, 11, 5),
    ],
)
def test_jump_hash_matches_published_vectors(key: int, buckets: int, bucket: int) -> None:
    assert _jump(key, buckets) == bucket


def test_assignment_is_pinned_across_releases() -> None:
    # Changing any of these would move runs between shards on an upgrade: a deliberate act.
    assert [shard_of("k4q95w5", n) for n in (2, 3, 4, 10)] == [0, 2, 3, 3]
    assert [shard_of("7wq2m3x", n) for n in (2, 3, 4, 10)] == [1, 1, 1, 8]
    assert [shard_of("été-run", n) for n in (2, 3, 4, 10)] == [1, 1, 1, 9]


@pytest.mark.process
def test_assignment_does_not_depend_on_the_process() -> None:
    # str hashing is salted per process; a shard of one pod must agree with the next one's.
    code = (
        "from watcher.sharding import shard_of; print([shard_of(f'run{i}', 7) for i in range(50)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{[shard_of(f'run{i}', 7) for i in range(50)]}\n"}


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 16])
def test_every_run_has_exactly_one_shard_and_the_shares_are_even(total: int) -> None:
    shards = [Shard(index, total) for index in range(total)]
    counts: Counter[int] = Counter()
    for run_id in RUN_IDS:
        (owner,) = [shard.index for shard in shards if shard.owns(run_id)]
        counts[owner] += 1
    assert set(counts) == set(range(total))
    share = len(RUN_IDS) / total
    assert all(abs(count - share) < 5 * share**0.5 for count in counts.values()), counts


@pytest.mark.parametrize("total", [1, 2, 3, 9])
def test_one_more_shard_takes_runs_only_for_itself_about_its_share(total: int) -> None:
    before = {run_id: shard_of(run_id, total) for run_id in RUN_IDS}
    after = {run_id: shard_of(run_id, total + 1) for run_id in RUN_IDS}
    moved = [run_id for run_id in RUN_IDS if before[run_id] != after[run_id]]
    assert {after[run_id] for run_id in moved} == {total}, "runs move only to the new shard"
    assert len(moved) / len(RUN_IDS) == pytest.approx(1 / (total + 1), abs=0.02)


def test_any_string_the_api_sends_has_a_shard() -> None:
    for run_id in ("", "\udc80", "x" * 100_000, "\x00", "日本語"):
        assert 0 <= shard_of(run_id, 5) < 5


@pytest.mark.parametrize(
    ("hostname", "ordinal"),
    [
        ("loops-watcher-2", 2),
        ("loops-watcher-0", 0),
        ("loops-watcher-12.loops-watcher.monitoring.svc.cluster.local", 12),
        ("watcher-7-abc12", None),  # a Deployment's pod: the suffix is random, not an ordinal
        ("loops-watcher", None),
        ("node7", None),
        ("", None),
    ],
)
def test_hostname_ordinal_is_the_statefulset_suffix(hostname: str, ordinal: int | None) -> None:
    assert hostname_ordinal(hostname) == ordinal
