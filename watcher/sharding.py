"""Which runs one watcher owns when several share the work: a stable hash of each run's ID.

A run belongs to exactly one of `total` shards: the 64-bit prefix of the SHA-256 of its ID
(UTF-8) fed to Lamping and Veach's jump consistent hash. SHA-256 makes the answer the same in
every process and release (Python's `hash()` of a str is salted per process); the jump hash
makes growing from N to N+1 shards move only the runs the new shard takes over, about
1/(N+1) of them, where `hash % N` would move nearly all.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_ORDINAL = re.compile(r"-([0-9]+)$")
_MASK = (1 << 64) - 1


def _jump(key: int, buckets: int) -> int:
    """Jump consistent hash ("A Fast, Minimal Memory, Consistent Hash Algorithm", 2014)."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(run_id: str, total: int) -> int:
    """The shard (0 to total-1) that owns this run."""
    # surrogatepass: an ID from the API may carry a lone surrogate; it still needs a home.
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).digest()
    return _jump(int.from_bytes(digest[:8], "big"), total)


def hostname_ordinal(hostname: str) -> int | None:
    """The ordinal a StatefulSet puts at the end of a pod's name (loops-watcher-2 -> 2)."""
    match = _ORDINAL.search(hostname.split(".", 1)[0])
    return int(match[1]) if match else None


@dataclass(frozen=True, slots=True)
class Shard:
    """This watcher's share of the runs: shard `index` of `total`."""

    index: int = 0
    total: int = 1

    def owns(self, run_id: str) -> bool:
        return self.total == 1 or shard_of(run_id, self.total) == self.index
