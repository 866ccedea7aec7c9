"""What the benchmark asks for: which keys, which values (not which system answers).

A L{KeyValueWorkload} hands out a fresh set of keys for every measured run, so every put of a
run inserts a key that did not exist and every get that follows reads one that does.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from chainstore.limits import MAX_KEY_BYTES, MAX_VALUE_BYTES

MIN_KEY_BYTES = 8


@dataclass(frozen=True)
class KeyValueWorkload:
    """Keys of exactly C{key_size} printable bytes, spread over the key space; one value of
    C{value_size} bytes."""

    key_size: int = 16
    value_size: int = 100

    def __post_init__(self) -> None:
        if not MIN_KEY_BYTES <= self.key_size <= MAX_KEY_BYTES:
            raise ValueError(
                f"key size must be {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes, not {self.key_size}")
        if not 0 <= self.value_size <= MAX_VALUE_BYTES:
            raise ValueError(
                f"value size must be 0-{MAX_VALUE_BYTES} bytes, not {self.value_size}")

    def keys(self, tag: str, count: int) -> list[bytes]:
        """C{count} keys of the key set named C{tag}: the same tag gives the same keys.

        Hex digits of a hash, like YCSB's hashed keys, so inserts land all over the store's
        B-tree instead of appending at its end.
        """
        return [
            hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=self.key_size)
            .hexdigest()[:self.key_size].encode("ascii")
            for i in range(count)
        ]

    def value(self) -> bytes:
        """The value every put writes: incompressible bytes, the same in every run."""
        return random.Random(self.value_size).randbytes(self.value_size)

    def describe(self) -> dict[str, int]:
        return {"key_bytes": self.key_size, "value_bytes": self.value_size}
