"""Shape buckets: sizes are rounded up to a few values, so a jitted program compiles once per bucket, not once per
batch size or sequence length."""

from __future__ import annotations

from typing import Sequence

from jaxagent.errors import UserError

POWERS_OF_TWO = tuple(2**k for k in range(20))
# Training sequence lengths: finer steps where most agent trajectories fall, powers of two beyond.
LENGTH_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class BucketError(UserError):
    """A size beyond the largest bucket."""


def round_up(n: int, sizes: Sequence[int], what: str) -> int:
    """The smallest bucket size >= n; `what` names the size in the error past the largest bucket."""
    for size in sizes:
        if size >= n:
            return size
    raise BucketError(f"{what}={n} exceeds the largest bucket {max(sizes)}")
