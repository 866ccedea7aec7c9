"""Checkers of a torture history: linearizability per key, lost writes, replica agreement.

The linearizability checker searches for an order of one key's operations that respects real
time and explains every answer with a register that holds one value or nothing. It is the
Wing-Gong/Lowe search with Porcupine's improvements: the operations sit in a doubly linked list
of call and return events sorted by time; an operation can be linearized only while no return
precedes its call in the list (so every operation that completed before it was invoked is
already linearized); and each (set of linearized operations, register state) pair is explored
once. Operations whose outcome is unknown may take effect at any time after their invocation or
never: their return is at +infinity and the search may finish without them. Keys are checked
apart (P-compositionality).

When a history is not linearizable the checker also finds a small counterexample: the shortest
failing prefix of the history (binary search on completion times), then the fewest operations
around its last completion that still cannot be ordered, whatever the key held before them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from chainstore.ring import Ring, position
from chainstore.storage import STORE_NAMES
from torture.history import DELETE, FAIL, GET, OK, PUT, UNKNOWN, History, Operation, split_by_key

INF = math.inf

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not_linearizable"
UNDECIDED = "undecided"

# What an operation requires of the register before it (pre) ...
_ANY, _EQUAL, _PRESENT = 0, 1, 2
# ... and leaves in it (post): a value id, or _SAME. Value id 0 is "absent"; real values are
# numbered from 1; _OTHER stands for any value that no read in the checked operations names.
_SAME = -2
_ABSENT = 0
_OTHER = -1

#: Default step budget of one key's search; a step is one look at one list entry.
DEFAULT_MAX_STEPS = 2_000_000


@dataclass(frozen=True)
class Result:
    """The verdict on one key's operations.

    On C{not_linearizable}, C{operations} is a small set of operations that cannot be ordered
    and C{explanation} says why; C{steps} counts the search steps spent (verdict and
    counterexample).
    """

    key: bytes | None
    verdict: str
    steps: int
    operations: tuple[Operation, ...] = ()
    explanation: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == LINEARIZABLE

    @property
    def decided(self) -> bool:
        return self.verdict != UNDECIDED


@dataclass(frozen=True)
class Anomaly:
    """One thing a checker found wrong (or could not check), for reports.

    C{where} names the replicas involved, as (server, store) pairs.
    """

    kind: str
    key: bytes | None
    explanation: str
    operations: tuple[Operation, ...] = ()
    where: tuple[tuple[str, str], ...] = ()


# Anomaly kinds. The first ones are violations; the informational ones say what went unchecked.
LOST_WRITE = "lost_write"
PHANTOM_VALUE = "phantom_value"
REPLICA_MISSING = "replica_missing"
REPLICA_DIFFERENT = "replica_different"
STRAY_KEY = "stray_key"
NO_FINAL_READ = "no_final_read"
MISSING_DUMP = "missing_dump"
VIOLATIONS = (NOT_LINEARIZABLE, LOST_WRITE, PHANTOM_VALUE, REPLICA_MISSING, REPLICA_DIFFERENT)
INFORMATIONAL = (UNDECIDED, STRAY_KEY, NO_FINAL_READ, MISSING_DUMP)


# -- the search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """An operation as the search sees it: a precondition, an effect, an interval."""

    op: Operation
    invoke: float
    complete: float  # +inf for an optional operation
    pre: int
    arg: int  # the value id an _EQUAL precondition wants
    post: int  # value id written, or _SAME
    optional: bool

    @property
    def writes(self) -> bool:
        return self.post != _SAME


class _Budget:
    """Steps (and optionally seconds) a check may spend; shared by all its searches."""

    def __init__(self, max_steps: int, seconds: float | None, clock: Callable[[], float]) -> None:
        self.max_steps = max_steps
        self.used = 0
        self._clock = clock
        self._deadline = None if seconds is None else clock() + seconds

    def remaining(self) -> int:
        return self.max_steps - self.used

    def out_of_time(self) -> bool:
        return self._deadline is not None and self._clock() > self._deadline


class _Values:
    """Value ids: 0 for absent, 1, 2, ... for values in order of first sight."""

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}

    def id(self, value: bytes | None) -> int:
        if value is None:
            return _ABSENT
        return self._ids.setdefault(value, len(self._ids) + 1)


def _prepare(ops: Iterable[Operation], values: _Values, observe: bool) -> list[_Step]:
    """The steps of C{ops}: failed writes and unanswered gets dropped, unknown writes optional.

    With C{observe}, a delete's answer tells the state before it: KeyNotFound means absent
    (a read of absence that changes nothing), ok means the key held a value.
    """
    steps = []
    for op in ops:
        if op.kind == GET:
            if op.outcome != OK:
                continue  # a get without an answer constrains nothing
            pre, arg, post = _EQUAL, values.id(op.value), _SAME
        elif op.outcome == FAIL:
            continue  # refused before anything happened
        elif op.kind == PUT:
            pre, arg, post = _ANY, 0, values.id(op.value)
        elif op.outcome == OK and observe:
            pre, arg, post = (_EQUAL, _ABSENT, _SAME) if op.missing else (_PRESENT, 0, _ABSENT)
        else:
            pre, arg, post = _ANY, 0, _ABSENT
        optional = op.outcome == UNKNOWN
        complete = INF if optional else op.complete
        assert complete is not None
        steps.append(_Step(op, op.invoke, complete, pre, arg, post, optional))
    return steps


def _pruned(steps: list[_Step]) -> list[_Step]:
    """Drop optional puts whose value nobody observes: leaving them out never hurts.

    Between such a put and the next write no read can be linearized (it would have returned
    the put's value), so removing the put from any linearization leaves one that is still
    valid. A delete that wants the key present does observe it, so puts that such a delete
    may follow are kept.
    """
    read = {s.arg for s in steps if s.pre == _EQUAL}
    present_until = max((s.complete for s in steps if s.pre == _PRESENT), default=-INF)
    return [s for s in steps
            if not (s.optional and s.post > _ABSENT and s.post not in read
                    and s.invoke > present_until)]


def _search(steps: list[_Step], initial: int, budget: _Budget,
            stuck: list[Operation] | None = None) -> bool | None:
    """True if C{steps} linearize from state C{initial}, False if not, None if out of budget.

    C{stuck}, if given, receives the operations whose completion the search could not pass
    when it had linearized the most mandatory steps: where a violation most likely is.
    """
    steps = _pruned(steps)
    # Values that no read names are indistinguishable to the register: fold them into one, so
    # that states merge and the puts of such values become interchangeable.
    read = {s.arg for s in steps if s.pre == _EQUAL}
    if initial > _ABSENT and initial not in read:
        initial = _OTHER
    steps = [s if s.post <= _ABSENT or s.post in read else replace(s, post=_OTHER)
             for s in steps]
    n = len(steps)
    remaining = mandatory = sum(1 for s in steps if not s.optional)
    if remaining == 0:
        return True  # optional writes have no preconditions: they can all go last, or never
    pre = [s.pre for s in steps]
    arg = [s.arg for s in steps]
    post = [s.post for s in steps]
    optional = [s.optional for s in steps]
    bits = [1 << i for i in range(n)]
    # Optional steps with the same precondition and effect are interchangeable (their returns
    # are all at +infinity), so they are applied in invocation order only: step i waits for the
    # bit in before[i] (0: nothing to wait for). This keeps k pending unknown deletes from
    # multiplying the states by 2**k.
    before = [0] * n
    last_alike: dict[tuple[int, int, int], int] = {}
    for i in sorted(range(n), key=lambda i: (steps[i].invoke, i)):
        if optional[i]:
            alike = (pre[i], arg[i], post[i])
            if alike in last_alike:
                before[i] = bits[last_alike[alike]]
            last_alike[alike] = i
    # Event node 2i is the call of step i, 2i+1 its return; node 2n is the list head. At equal
    # times calls sort first: operations that touch in time are concurrent.
    events = sorted([(s.invoke, 0, i) for i, s in enumerate(steps)]
                    + [(s.complete, 1, i) for i, s in enumerate(steps)])
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for _, is_return, i in events:
        node = 2 * i + is_return
        nxt[last] = node
        prv[node] = last
        last = node

    limit = budget.remaining()
    count = 0
    # The linearized set, split: mandatory steps, and optional steps already applied. A node
    # with fewer optional steps applied dominates one with more (same mandatory set and state):
    # a step left unapplied may still be applied later, or never. So each (mandatory set,
    # state) keeps the optional sets explored from it, and a node is skipped when one of them
    # is a subset of its own.
    done = 0
    applied = 0
    state = initial
    # An optional write is applied only right before a step that observes the register (an
    # _EQUAL or _PRESENT precondition): followed by another write or by nothing, leaving it
    # out gives a linearization just as valid. C{must_observe} is set after applying one, and
    # is part of the node (nodes are keyed by state * 2 + must_observe).
    must_observe = False
    deepest = -1
    stack: list[tuple[int, int, bool]] = []
    seen: dict[tuple[int, int], int | list[int]] = {}
    entry = nxt[head]
    while remaining:
        count += 1
        if count > limit or (count & 4095 == 0 and budget.out_of_time()):
            budget.used += count
            return None
        i = entry >> 1
        if not entry & 1:  # a call: try to linearize step i now
            p = pre[i]
            if (p == _ANY and not must_observe) or (p == _EQUAL and state == arg[i]) \
                    or (p == _PRESENT and state != 0):
                new_state = state if post[i] == _SAME else post[i]
                if optional[i]:
                    new_done, new_applied = done, applied | bits[i]
                    new_observe = post[i] != _SAME
                    fresh = (applied & before[i]) == before[i] and _fresh(
                        seen, (new_done, 2 * new_state + new_observe), new_applied)
                else:
                    new_done, new_applied, new_observe = done | bits[i], applied, False
                    fresh = _fresh(seen, (new_done, 2 * new_state), new_applied)
                if fresh:
                    stack.append((entry, state, must_observe))
                    state, done, applied = new_state, new_done, new_applied
                    must_observe = new_observe
                    # Lift the call and its return out of the list.
                    ret = entry + 1
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[ret]] = nxt[ret]
                    if nxt[ret] != -1:
                        prv[nxt[ret]] = prv[ret]
                    if not optional[i]:
                        remaining -= 1
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
        else:  # a return: the step it ends must have been linearized already; backtrack
            if stuck is not None:
                depth = mandatory - remaining
                if depth > deepest:
                    deepest = depth
                    stuck[:] = [steps[i].op]
                elif depth == deepest and len(stuck) < 8 and steps[i].op not in stuck:
                    stuck.append(steps[i].op)
            if not stack:
                budget.used += count
                return False
            entry, state, must_observe = stack.pop()
            i = entry >> 1
            if optional[i]:
                applied ^= bits[i]
            else:
                done ^= bits[i]
                remaining += 1
            # Put the return back first, then the call (the reverse of lifting).
            ret = entry + 1
            nxt[prv[ret]] = ret
            if nxt[ret] != -1:
                prv[nxt[ret]] = ret
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            entry = nxt[entry]
    budget.used += count
    return True


def _fresh(seen: dict[tuple[int, int], int | list[int]], node: tuple[int, int],
           applied: int) -> bool:
    """Record the node (mandatory set, state) with C{applied} optional steps, unless an
    explored node dominates it (the same with a subset of them applied)."""
    explored = seen.get(node)
    if explored is None:
        seen[node] = applied
        return True
    if isinstance(explored, int):
        if not explored & ~applied:
            return False
        seen[node] = [applied] if not applied & ~explored else [explored, applied]
        return True
    if any(not old & ~applied for old in explored):
        return False
    explored[:] = [old for old in explored if applied & ~old]
    explored.append(applied)
    return True


def _fails(steps: list[_Step], initials: Iterable[int], budget: _Budget) -> bool | None:
    """True if C{steps} linearize from none of C{initials}; None if the budget ran out."""
    for initial in initials:
        verdict = _search(steps, initial, budget)
        if verdict is None:
            return None
        if verdict:
            return False
    return True


# -- linearizability -----------------------------------------------------------------------------


def check_linearizable(ops: Iterable[Operation], *, initial: bytes | None = None,
                       delete_answers_observe: bool = True,
                       max_steps: int = DEFAULT_MAX_STEPS, seconds: float | None = None,
                       clock: Callable[[], float] = time.monotonic) -> Result:
    """Decide whether one key's operations are linearizable for a register starting at
    C{initial} (C{None}: the key is absent).

    @param delete_answers_observe: a delete answered KeyNotFound saw the key absent, one
        answered ok saw it present. Pass False when clients retry deletes (client.KVStore
        does): a retry of a delete that did apply can answer KeyNotFound, so the answer then
        says only that the key is absent afterwards.
    @param max_steps: search steps for the verdict; the counterexample gets as many again.
        Past them (or past C{seconds} on C{clock}) the verdict is C{undecided}.
    """
    ops = list(ops)
    keys = {op.key for op in ops}
    if len(keys) > 1:
        raise ValueError("check_linearizable takes the operations of one key; "
                         "use check_history_linearizable for a whole history")
    key = next(iter(keys), None)
    values = _Values()
    steps = _prepare(ops, values, delete_answers_observe)
    initial_id = values.id(initial)
    budget = _Budget(max_steps, seconds, clock)

    quick = _impossible_reads(steps, ops, initial_id)
    if quick is not None:
        involved, why = quick
        return Result(key, NOT_LINEARIZABLE, 0, involved, why)

    stuck: list[Operation] = []
    verdict = _search(steps, initial_id, budget, stuck)
    if verdict:
        return Result(key, LINEARIZABLE, budget.used)
    # Not linearizable, or no verdict yet: look for a small window of operations that cannot
    # be ordered, where the search got stuck. Finding one proves a violation on its own.
    search_budget = _Budget(max_steps, seconds, clock)
    found = _counterexample(steps, initial_id, search_budget, stuck, proven=verdict is False)
    spent = budget.used + search_budget.used
    if found is not None:
        return Result(key, NOT_LINEARIZABLE, spent, *found)
    if verdict is None:
        return Result(key, UNDECIDED, spent,
                      explanation=f"no verdict on {key!r} within {max_steps} search steps"
                      + ("" if seconds is None else f" or {seconds} s"))
    return Result(key, NOT_LINEARIZABLE, spent, tuple(s.op for s in steps),
                  _explain_unshrunk(len(steps)))


def check_history_linearizable(history: History | Iterable[Operation],
                               **options: object) -> dict[bytes, Result]:
    """L{check_linearizable} for every key of C{history}, each key on its own."""
    ops = history.operations() if isinstance(history, History) else list(history)
    return {key: check_linearizable(key_ops, **options)  # type: ignore[arg-type]
            for key, key_ops in split_by_key(ops).items()}


def _impossible_reads(steps: list[_Step], ops: list[Operation],
                      initial: int) -> tuple[tuple[Operation, ...], str] | None:
    """A read that no order can explain on its own: of a value never written, or of a value
    whose every put was invoked after the read completed."""
    first_invoke: dict[int, float] = {}
    for s in steps:
        if s.post > _ABSENT:
            first_invoke[s.post] = min(first_invoke.get(s.post, INF), s.invoke)
    for s in steps:
        if s.pre != _EQUAL or s.arg == _ABSENT or s.arg == initial:
            continue
        if s.arg not in first_invoke:
            refused = tuple(op for op in ops
                            if op.kind == PUT and op.outcome == FAIL and op.value == s.op.value)
            return ((s.op,) + refused,
                    f"not linearizable: {s.op.describe()} read a value that no put wrote"
                    + (" (its only puts were refused)" if refused else ""))
        if first_invoke[s.arg] > s.complete:
            puts = tuple(t.op for t in steps if t.post == s.arg)
            return ((s.op,) + puts,
                    f"not linearizable: {s.op.describe()} returned a value before any put of "
                    f"it was invoked")
    return None


def _prefix(steps: list[_Step], t: float) -> list[_Step]:
    """The history as it stood at time C{t}: later invocations gone, unfinished reads dropped,
    unfinished writes optional (they may or may not have taken effect yet)."""
    out = []
    for s in steps:
        if s.invoke > t:
            continue
        if s.complete <= t:
            out.append(s)
        elif s.writes:
            out.append(replace(s, complete=INF, optional=True))
    return out


def _window(prefix: list[_Step], s_time: float) -> list[_Step]:
    """The steps of C{prefix} not completed before C{s_time}; those invoked before it may
    already have taken effect, so their reads are dropped and their writes made optional."""
    out = []
    for s in prefix:
        if s.complete < s_time:
            continue
        if s.invoke >= s_time:
            out.append(s)
        elif s.writes:
            out.append(replace(s, complete=INF, optional=True))
    return out


def _initials(prefix: list[_Step], window: list[_Step], s_time: float, initial: int) -> list[int]:
    """Every state the register may hold at C{s_time}, values no read in C{window} names
    folded into one."""
    possible = {initial} | {s.post for s in prefix if s.writes and s.invoke < s_time}
    read = {s.arg for s in window if s.pre == _EQUAL}
    return sorted({v if v == _ABSENT or v in read else _OTHER for v in possible})


def _removable(step: _Step, window: list[_Step]) -> bool:
    """Whether dropping C{step} keeps every failing window failing.

    Reads constrain and change nothing: any order of the rest is one of the whole. A put whose
    value nothing reads (and that no delete needing a value may follow) can also go: between
    it and the next write nothing was read, so the order without it still explains every read.
    """
    if not step.writes:
        return True
    if step.post == _ABSENT:
        return False
    if any(s.pre == _EQUAL and s.arg == step.post for s in window if s is not step):
        return False
    return not any(s.pre == _PRESENT and s.complete >= step.invoke for s in window)


#: How many invocations back from a suspect a local window may reach.
WINDOW_REACH = 64


def _counterexample(steps: list[_Step], initial: int, budget: _Budget, stuck: list[Operation],
                    proven: bool) -> tuple[tuple[Operation, ...], str] | None:
    """A few operations that cannot be ordered, and why; None if none was found in budget.

    First near the operations the search got stuck at; then, if the search C{proven} the
    history not linearizable, at the end of its shortest failing prefix.
    """
    suspects = sorted({op.complete for op in stuck if op.complete is not None})
    for t in suspects:
        found = _local(steps, initial, t, budget, WINDOW_REACH)
        if found is not None:
            return found
    if not proven:
        return None
    times = sorted({s.complete for s in steps if not s.optional})
    # Failing is monotone in t (a linearizable history has linearizable prefixes), and the
    # prefix at the last completion is the whole history, known to fail.
    lo, hi = 0, len(times) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        verdict = _fails(_prefix(steps, times[mid]), [initial], budget)
        if verdict is None:
            return None
        if verdict:
            hi = mid
        else:
            lo = mid + 1
    return _local(steps, initial, times[lo], budget, None)


def _local(steps: list[_Step], initial: int, t: float, budget: _Budget,
           reach: int | None) -> tuple[tuple[Operation, ...], str] | None:
    """The fewest operations around the completions at C{t} that cannot be ordered, whatever
    the key held before them; None if no window reaching C{reach} invocations back fails."""
    prefix = _prefix(steps, t)
    culprits = [s for s in prefix if s.complete == t and not s.optional]
    if not culprits:
        return None
    start = min(s.invoke for s in culprits)
    earliest = min(s.invoke for s in prefix)
    starts = sorted({s.invoke for s in prefix if s.invoke <= start}, reverse=True)
    back = 1
    while True:
        if reach is not None and back > reach:
            return None
        s_time = starts[min(back - 1, len(starts) - 1)]
        if s_time <= earliest:
            s_time = -INF  # the whole prefix, from the real initial state
            window, initials = prefix, [initial]
        else:
            window = _window(prefix, s_time)
            initials = _initials(prefix, window, s_time, initial)
        verdict = _fails(window, initials, budget)
        if verdict is None:
            return None
        if verdict:
            break
        if s_time == -INF:
            return None
        back *= 2

    def initials_of(ws: list[_Step]) -> list[int]:
        return [initial] if s_time == -INF else _initials(prefix, ws, s_time, initial)

    # Drop every operation that the failure does not need.
    kept = list(window)
    if len(kept) <= 200:
        for step in sorted(kept, key=lambda s: s.invoke):
            if any(step is c for c in culprits) or not _removable(step, kept):
                continue
            trial = [s for s in kept if s is not step]
            verdict = _fails(trial, initials_of(trial), budget)
            if verdict is None:
                break
            if verdict:
                kept = trial
    return (tuple(sorted((s.op for s in kept), key=lambda o: (o.invoke, o.index))),
            _explain(kept, culprits, s_time, steps))


def _explain_unshrunk(count: int) -> str:
    return (f"not linearizable: no order of the key's {count} operations that respects real "
            f"time explains every answer (the budget ran out before a smaller counterexample "
            f"was found)")


def _explain(kept: list[_Step], culprits: list[_Step], s_time: float,
             steps: list[_Step]) -> str:
    """Say which answer cannot be explained, by which operations, with a hint for stale reads."""
    known = [s for s in kept if s.op.outcome != UNKNOWN]
    unknown = len(kept) - len(known)
    end = culprits[0].complete
    lines = [f"not linearizable: nothing explains the answers up to {end:.6f}, when "
             f"{culprits[0].op.describe()} completed.",
             "No order of the operations below that respects real time (one that completed "
             "before another was invoked comes first) gives every operation its answer"
             + (", starting from the key's initial state:" if s_time == -INF else
                f", whatever the key held at time {s_time:.6f}:")]
    for s in known:
        note = ""
        if s.optional and s.invoke < s_time:
            note = " (may have taken effect before the window)"
        elif s.optional:
            note = " (still running then: may or may not have taken effect)"
        lines.append("  " + s.op.describe() + note)
    if unknown:
        lines.append(f"  and {unknown} writes of unknown outcome, which may each take effect "
                     f"at any time after their invocation, or never")
    for s in kept:
        if s.pre != _EQUAL or s.arg == _ABSENT:
            continue
        for writer in (w for w in steps if w.post == s.arg):
            later = [w for w in steps
                     if w.writes and w is not writer and not w.optional
                     and writer.complete < w.invoke and w.complete < s.invoke]
            if later:
                lines.append(f"Stale read: {s.op.describe()} returned the value of "
                             f"{writer.op.describe()}, which {later[-1].op.describe()} "
                             f"replaced before the read was invoked.")
    return "\n".join(lines)


# -- lost writes ---------------------------------------------------------------------------------


def check_no_lost_writes(history: History | Iterable[Operation],
                         final_reads: Mapping[bytes, bytes | None]) -> list[Anomaly]:
    """Every acknowledged write must survive: its key's final value is its own, or that of a
    write that may be ordered after it.

    C{final_reads} maps each key to the value read after healing and quiescence (C{None}:
    absent). A write X may be ordered after an acknowledged write W unless X completed before
    W was invoked; failed writes never happened. An acknowledged put is lost if the final value
    is neither its own nor written by such an X; an acknowledged delete (also one answered
    KeyNotFound: the key was absent after it) is lost if the key holds a value that no such X
    wrote. A final value that no put wrote is a C{phantom_value}. Keys with acknowledged writes
    but no final read are reported as C{no_final_read}, unchecked.
    """
    ops = history.operations() if isinstance(history, History) else list(history)
    anomalies = []
    for key, key_ops in split_by_key(ops).items():
        writes = [op for op in key_ops if op.kind in (PUT, DELETE) and op.outcome != FAIL]
        acknowledged = [op for op in writes if op.outcome == OK]
        if key not in final_reads:
            if acknowledged:
                anomalies.append(Anomaly(NO_FINAL_READ, key,
                                         f"{len(acknowledged)} acknowledged writes of {key!r} "
                                         f"were not checked: no final read of the key"))
            continue
        final = final_reads[key]
        if final is not None and not any(op.kind == PUT and op.value == final for op in writes):
            anomalies.append(Anomaly(PHANTOM_VALUE, key,
                                     f"the final value of {key!r}, {final!r}, was written by "
                                     f"no put that may have taken effect"))
        for w in acknowledged:
            if _holds(w, final):
                continue
            after = [x for x in writes if x is not w
                     and (x.complete is None or x.complete >= w.invoke)]
            if any(_holds(x, final) for x in after):
                continue
            shown = "absent" if final is None else repr(final)
            by = [x for x in writes if _holds(x, final)]
            anomalies.append(Anomaly(
                LOST_WRITE, key,
                f"lost write: {w.describe()} was acknowledged, but the final value of {key!r} is "
                f"{shown}, which no write that may be ordered after it"
                + (" wrote" if final is not None else " left (no delete could follow it)")
                + (f"; it was written by {by[0].describe()}, which completed before the lost "
                   f"write was invoked" if by else ""),
                operations=(w, *by[:1])))
    return anomalies


def _holds(write: Operation, final: bytes | None) -> bool:
    """Whether C{write}, taking effect last, would leave C{final} in its key."""
    return final is None if write.kind == DELETE else write.value == final


# -- replica agreement ---------------------------------------------------------------------------


def check_replicas(ring: Ring,
                   dumps: Mapping[tuple[str, str], Mapping[bytes, bytes]]) -> list[Anomaly]:
    """Every key held by any live replica of its range must be held, with the same value, by
    every live replica of that range.

    C{dumps} maps (server name, store name) to that store's contents, read after healing and
    quiescence. A range's replicas are the stores C{STORE_NAMES[k]} of the members of
    C{ring.ring_chain(index)} at place C{k}, dead members skipped (their stores are stale by
    design). Where the replicas disagree, the value most of them hold (the first in chain
    order on a tie) is taken as right and each other replica reported: C{replica_missing} if
    it lacks the key, C{replica_different} if it holds another value. Keys found in a store
    that is no live replica of their range are C{stray_key}; live replicas with no dump are
    C{missing_dump}, and go unchecked.
    """
    anomalies = []
    holders: dict[int, tuple[tuple[str, str], ...]] = {}
    for index in range(len(ring)):
        holders[index] = tuple((node.name, STORE_NAMES[k])
                               for k, node in enumerate(ring.ring_chain(index))
                               if node.name not in ring.dead)
    member = {n.name for n in ring.nodes}
    keys_of: dict[int, set[bytes]] = {}
    for where, data in sorted(dumps.items()):
        server = where[0]
        if server in ring.dead:
            continue
        for key in data:
            index = ring.owner_index(position(key))
            if where not in holders[index] or server not in member:
                anomalies.append(Anomaly(STRAY_KEY, key,
                                         f"{server}/{where[1]} holds {key!r}, but is no live "
                                         f"replica of its range", where=(where,)))
                continue
            keys_of.setdefault(index, set()).add(key)
    reported_dumps = set()
    for index in sorted(keys_of):
        replicas = [where for where in holders[index] if where in dumps]
        for where in holders[index]:
            if where not in dumps and where not in reported_dumps:
                reported_dumps.add(where)
                anomalies.append(Anomaly(MISSING_DUMP, None,
                                         f"no dump of {where[0]}/{where[1]}, a live replica: "
                                         f"its range went unchecked", where=(where,)))
        for key in sorted(keys_of[index]):
            held = {where: dumps[where].get(key) for where in replicas}
            present = [v for v in held.values() if v is not None]
            if len(present) == len(held) and len(set(present)) == 1:
                continue
            tally = Counter(present)
            right = max(present, key=lambda v: (tally[v], -present.index(v)))
            for where, value in held.items():
                if value is None:
                    anomalies.append(Anomaly(
                        REPLICA_MISSING, key,
                        f"{where[0]}/{where[1]} lacks {key!r}, which other replicas of its "
                        f"range hold as {right!r}", where=(where,)))
                elif value != right:
                    anomalies.append(Anomaly(
                        REPLICA_DIFFERENT, key,
                        f"{where[0]}/{where[1]} holds {key!r} as {value!r}, other replicas of "
                        f"its range as {right!r}", where=(where,)))
    return anomalies


# -- the summary ---------------------------------------------------------------------------------


@dataclass
class Summary:
    """Everything the checkers found, counted per kind for the report table."""

    linearizability: dict[bytes, Result] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Count per kind, every kind listed (zeros included), violations first."""
        counts = dict.fromkeys(VIOLATIONS + INFORMATIONAL, 0)
        for result in self.linearizability.values():
            if result.verdict != LINEARIZABLE:
                counts[result.verdict] += 1
        for anomaly in self.anomalies:
            counts[anomaly.kind] = counts.get(anomaly.kind, 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        """No violation found and every key decided."""
        counts = self.counts
        return not any(counts[kind] for kind in VIOLATIONS) and not counts[UNDECIDED]

    def rows(self) -> list[tuple[str, int]]:
        """(kind, count) rows for a report table, in a fixed order."""
        return list(self.counts.items())

    def details(self) -> list[str]:
        """Every violation's explanation, then the informational ones."""
        lines = [r.explanation + "\n" + "\n".join("  " + op.describe() for op in r.operations)
                 for r in self.linearizability.values() if r.verdict == NOT_LINEARIZABLE]
        lines += [a.explanation for a in self.anomalies if a.kind in VIOLATIONS]
        lines += [r.explanation for r in self.linearizability.values()
                  if r.verdict == UNDECIDED]
        lines += [a.explanation for a in self.anomalies if a.kind not in VIOLATIONS]
        return lines


def check_all(history: History | Iterable[Operation], *,
              final_reads: Mapping[bytes, bytes | None] | None = None,
              ring: Ring | None = None,
              dumps: Mapping[tuple[str, str], Mapping[bytes, bytes]] | None = None,
              **options: object) -> Summary:
    """Run every checker that has its input; C{options} go to L{check_linearizable}."""
    ops = history.operations() if isinstance(history, History) else list(history)
    summary = Summary(check_history_linearizable(ops, **options))
    if final_reads is not None:
        summary.anomalies += check_no_lost_writes(ops, final_reads)
    if ring is not None and dumps is not None:
        summary.anomalies += check_replicas(ring, dumps)
    return summary
