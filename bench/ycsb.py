"""YCSB-style workloads: a record set loaded first, then runs of reads and updates over it.

Workloads (YCSB's core workloads A, B, C, plus W):

- A: 50% reads, 50% updates ("update heavy")
- B: 95% reads, 5% updates ("read mostly")
- C: 100% reads ("read only")
- W: 100% updates ("write only": not a YCSB core workload; each update overwrites an existing
  record, as YCSB's updates do)

Key choice, as in YCSB: ``uniform`` (every record equally likely) or ``zipfian`` (YCSB's
ZipfianGenerator, constant 0.99: record of rank r is chosen with probability proportional to
1/(r+1)^0.99). Ranks are not clustered in the key space: record r's key is a hash of r, so the
popular records fall all over the key space and the chain's ranges, which is what YCSB's
"scrambled" zipfian achieves with its FNV hash of the rank (without that hash's collisions,
which make a few records slightly more popular than Zipf's law says).

Every run draws its sequence of operations before it starts, from a seed that names the run, so
the draw costs the measured loop nothing and every system gets exactly the same sequence.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

ZIPFIAN_CONSTANT = 0.99
DISTRIBUTIONS = ("uniform", "zipfian")


@dataclass(frozen=True)
class Workload:
    """A mix of reads and updates: C{read_fraction} of the operations are reads."""

    name: str
    read_fraction: float
    description: str

    @property
    def operations(self) -> tuple[str, ...]:
        """The operations it issues: "get" (read), "put" (update)."""
        if self.read_fraction >= 1:
            return ("get",)
        if self.read_fraction <= 0:
            return ("put",)
        return ("get", "put")


WORKLOADS: dict[str, Workload] = {
    "A": Workload("A", 0.50, "50% read, 50% update"),
    "B": Workload("B", 0.95, "95% read, 5% update"),
    "C": Workload("C", 1.00, "read only"),
    "W": Workload("W", 0.00, "update only"),
}


class ZipfianGenerator:
    """YCSB's ZipfianGenerator (Gray et al., "Quickly generating billion-record synthetic
    databases"): ranks 0..items-1, rank 0 the most popular, P(r) = 1/(r+1)^theta / zeta(items).

    Like YCSB's, it is exact for ranks 0 and 1 and approximates the others (with 1,000 items,
    rank 2 comes about 16% more often than Zipf's law says, the far tail slightly less).
    """

    def __init__(self, items: int, theta: float = ZIPFIAN_CONSTANT) -> None:
        if items < 1:
            raise ValueError("items must be >= 1")
        if not 0 < theta < 1:
            raise ValueError("theta must be in (0, 1)")
        self.items = items
        self.theta = theta
        self.zetan = zeta(items, theta)
        self._zeta2 = zeta(2, theta)
        self._alpha = 1.0 / (1.0 - theta)
        self._eta = ((1 - (2.0 / items) ** (1 - theta)) / (1 - self._zeta2 / self.zetan)
                     if items > 1 else 0.0)
        self._half_pow_theta = 1 + 0.5 ** theta

    def probability(self, rank: int) -> float:
        """Zipf's law for C{rank}: what the generator's frequencies approach."""
        return 1.0 / ((rank + 1) ** self.theta) / self.zetan

    def next(self, rng: random.Random) -> int:
        u = rng.random()
        uz = u * self.zetan
        if uz < 1.0:
            return 0
        if uz < self._half_pow_theta:
            return 1
        return min(self.items - 1,
                   int(self.items * (self._eta * u - self._eta + 1) ** self._alpha))


def zeta(n: int, theta: float) -> float:
    """The sum of 1/i^theta for i in 1..n."""
    return sum(1.0 / (i ** theta) for i in range(1, n + 1))


@dataclass(frozen=True)
class Operations:
    """One run's operations, drawn in advance: C{reads[i]} tells whether operation i is a read,
    C{records[i]} which record it touches."""

    reads: list[bool]
    records: list[int]

    def __len__(self) -> int:
        return len(self.records)


def draw(workload: Workload, distribution: str, records: int, count: int,
         seed: str) -> Operations:
    """C{count} operations of C{workload} over C{records} records, key choice C{distribution};
    the same arguments give the same operations."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}")
    rng = random.Random(seed)
    if distribution == "zipfian":
        zipf = ZipfianGenerator(records)
        chosen = [zipf.next(rng) for _ in range(count)]
    else:
        chosen = [rng.randrange(records) for _ in range(count)]
    fraction = workload.read_fraction
    reads = [rng.random() < fraction for _ in range(count)] if 0 < fraction < 1 else [
        fraction >= 1] * count
    return Operations(reads, chosen)


def record_keys(count: int, key_size: int = 16) -> list[bytes]:
    """The record set's keys: record r's key is C{key_size} hex digits of a hash of r (YCSB
    hashes its record numbers too), printable and valid in every system measured."""
    return [hashlib.blake2b(b"user%d" % r, digest_size=key_size).hexdigest()[:key_size]
            .encode("ascii") for r in range(count)]


def record_values(value_size: int) -> tuple[bytes, bytes]:
    """The two values a record may hold: the load phase writes the first, updates the second.
    Incompressible, fixed per size; a read must return one of them, which checks every answer
    for a few byte comparisons."""
    rng = random.Random(f"values-{value_size}")
    loaded = rng.randbytes(value_size)
    updated = rng.randbytes(value_size)
    if value_size and loaded == updated:
        raise AssertionError("the two record values must differ")
    return loaded, updated


def parse_names(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """Comma-separated distinct names among C{known}, in the order given."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"{text!r}: give distinct {what} among {','.join(known)}, "
                         "separated by commas")
    return names
