"""What the clients of a torture run asked and were told: the history the checkers judge.

Each operation is recorded twice: when a client invokes it (L{History.invoke}) and when the
answer arrives (L{History.complete}). Its outcome is one of:

- C{ok}: the server answered with a result. A C{get} carries the value it read (C{None} for
  KeyNotFound). A C{delete} answered KeyNotFound is an ok delete with C{missing=True}: it
  observed that the key held nothing and changed nothing. A C{put} observed nothing about the
  previous value: its C{updated} flag is not recorded, because a retried put may report it wrong.
- C{fail}: the request was refused before anything happened, so it definitely did not take
  effect (InvalidKey, ValueTooLarge; WriteLocked, NotResponsible, ServerStopped only when the
  client made that single attempt: see L{classify_error}).
- C{unknown}: no answer (a timeout, a lost connection, a server error): a write may or may not
  have taken effect, at any time after its invocation. Its complete time is C{None}.

A get that failed or timed out constrains nothing; the checkers drop it. Values written in one
run are meant to be unique, so that a read names the write it saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

PUT, GET, DELETE = "put", "get", "delete"
KINDS = (PUT, GET, DELETE)
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
OUTCOMES = (OK, FAIL, UNKNOWN)

#: Server errors that refuse a request before it changes anything.
_REFUSALS = {b"SERVER_WRITE_LOCK", b"SERVER_NOT_RESPONSIBLE", b"SERVER_STOPPED"}
#: Errors raised for a request that no server could ever apply.
_INVALID = {b"INVALID_KEY", b"VALUE_TOO_LARGE"}


@dataclass(frozen=True)
class Operation:
    """One client operation on one key, from invocation to outcome.

    C{value} is the value a put wrote or a get read (C{None}: the key was absent); a delete's
    is always C{None}. C{complete} is C{None} exactly when the outcome is C{unknown}. C{index}
    is the operation's place in its history, a stable name for reports.
    """

    process: int
    kind: str
    key: bytes
    value: bytes | None
    invoke: float
    complete: float | None
    outcome: str
    missing: bool = False
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if (self.complete is None) != (self.outcome == UNKNOWN):
            raise ValueError("an operation has a complete time exactly when its outcome is known")
        if self.complete is not None and self.complete < self.invoke:
            raise ValueError(f"operation completes ({self.complete}) before it is invoked "
                             f"({self.invoke})")
        if self.kind == PUT and not isinstance(self.value, bytes):
            raise ValueError("a put writes a bytes value")
        if self.kind == DELETE and self.value is not None:
            raise ValueError("a delete carries no value")
        if self.missing and not (self.kind == DELETE and self.outcome == OK):
            raise ValueError("only an ok delete can have found the key missing")

    def describe(self) -> str:
        """One line for reports: C{#12 p3 put b'k'=b'v' [1.000, 1.250] ok}."""
        if self.kind == PUT:
            what = f"put {self.key!r}={self.value!r}"
        elif self.kind == GET:
            seen = "absent" if self.value is None else repr(self.value)
            what = f"get {self.key!r} -> {seen}" if self.outcome == OK else f"get {self.key!r}"
        else:
            what = f"delete {self.key!r}" + (" -> not found" if self.missing else "")
        end = "..." if self.complete is None else f"{self.complete:.6f}"
        return f"#{self.index} p{self.process} {what} [{self.invoke:.6f}, {end}] {self.outcome}"


@dataclass
class _Pending:
    process: int
    kind: str
    key: bytes
    value: bytes | None
    invoke: float


class History:
    """The operations of a run, in invocation order; clients append, checkers read.

    @param clock: the time source for invocations and completions (C{reactor.seconds} in a
        run); without one, every call passes its time as C{at}.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._slots: list[Operation | _Pending] = []

    def _now(self, at: float | None) -> float:
        if at is not None:
            return at
        if self._clock is None:
            raise ValueError("this history has no clock: pass the time as at=")
        return self._clock()

    def invoke(self, process: int, kind: str, key: bytes, value: bytes | None = None, *,
               at: float | None = None) -> int:
        """Record that C{process} sends C{kind} on C{key} (writing C{value} for a put).

        Returns the handle that L{complete} takes.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        if (kind == PUT) != (value is not None):
            raise ValueError("a put, and only a put, carries a value")
        self._slots.append(_Pending(process, kind, key, value, self._now(at)))
        return len(self._slots) - 1

    def complete(self, handle: int, outcome: str, result: bytes | None = None, *,
                 missing: bool = False, at: float | None = None) -> Operation:
        """Record the outcome of operation C{handle}.

        C{result} is the value a get read (C{None}: KeyNotFound); C{missing} marks a delete
        answered KeyNotFound. An C{unknown} outcome records no complete time.
        """
        pending = self._slots[handle]
        if not isinstance(pending, _Pending):
            raise ValueError(f"operation {handle} is already complete")
        value = result if pending.kind == GET else pending.value
        complete = None if outcome == UNKNOWN else self._now(at)
        op = Operation(pending.process, pending.kind, pending.key, value, pending.invoke,
                       complete, outcome, missing=missing, index=handle)
        self._slots[handle] = op
        return op

    def append(self, op: Operation) -> Operation:
        """Add a finished operation (hand-made histories, loading); returns it with its index."""
        op = replace(op, index=len(self._slots))
        self._slots.append(op)
        return op

    def operations(self) -> list[Operation]:
        """Every operation in invocation order; any still pending counts as C{unknown}."""
        return [slot if isinstance(slot, Operation) else
                Operation(slot.process, slot.kind, slot.key,
                          slot.value if slot.kind == PUT else None, slot.invoke, None, UNKNOWN,
                          index=i)
                for i, slot in enumerate(self._slots)]

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations())

    def by_key(self) -> dict[bytes, list[Operation]]:
        """The operations of each key (P-compositionality: each key is checked alone)."""
        return split_by_key(self.operations())

    def save(self, out: IO[str]) -> None:
        """Write one JSON object per operation; bytes travel as latin-1 strings (lossless)."""
        for op in self.operations():
            out.write(json.dumps(_to_json(op), sort_keys=True) + "\n")

    @classmethod
    def load(cls, lines: Iterable[str]) -> History:
        """Read what L{save} wrote; blank lines are ignored."""
        history = cls()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                history.append(_from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"history line {number}: {e}") from None
        return history


def split_by_key(ops: Iterable[Operation]) -> dict[bytes, list[Operation]]:
    """Group operations by key, keeping their order."""
    keys: dict[bytes, list[Operation]] = {}
    for op in ops:
        keys.setdefault(op.key, []).append(op)
    return keys


def classify_error(kind: str, error: BaseException, *,
                   single_attempt: bool) -> tuple[str, bool]:
    """The (outcome, missing) to record for C{kind} answered by C{error}.

    KeyNotFound is an answer, not a failure: an ok get of nothing, an ok delete that found the
    key missing. Refusals (WriteLocked, NotResponsible, ServerStopped) prove that nothing
    happened only if that refusal answered the client's one and only attempt: a client that
    retries (client.KVStore does) may have had an earlier attempt time out after applying it,
    so pass C{single_attempt=False} and they count as C{unknown}. Anything else (timeouts,
    lost connections, ServerError) is C{unknown}.
    """
    code = getattr(error, "code", None)
    if code == b"KEY_NOT_FOUND" and kind in (GET, DELETE):
        return OK, kind == DELETE
    if code in _INVALID:
        return FAIL, False
    if code in _REFUSALS and single_attempt:
        return FAIL, False
    return UNKNOWN, False


def _bytes_to_json(data: bytes | None) -> str | None:
    return None if data is None else data.decode("latin-1")


def _bytes_from_json(text: Any) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"expected a string or null, not {type(text).__name__}")
    return text.encode("latin-1")


def _to_json(op: Operation) -> dict[str, Any]:
    return {"index": op.index, "process": op.process, "kind": op.kind,
            "key": _bytes_to_json(op.key), "value": _bytes_to_json(op.value),
            "invoke": op.invoke, "complete": op.complete, "outcome": op.outcome,
            "missing": op.missing}


def _from_json(obj: dict[str, Any]) -> Operation:
    key = _bytes_from_json(obj["key"])
    if key is None:
        raise ValueError("an operation needs a key")
    return Operation(process=obj["process"], kind=obj["kind"], key=key,
                     value=_bytes_from_json(obj["value"]), invoke=float(obj["invoke"]),
                     complete=None if obj["complete"] is None else float(obj["complete"]),
                     outcome=obj["outcome"], missing=bool(obj.get("missing", False)))
