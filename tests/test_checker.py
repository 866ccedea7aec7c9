"""The torture harness's history and checkers, on hand-made and generated histories.

The linearizability checker is compared with a brute-force reference (every order of every
subset of the unknown writes) on small histories, so that each verdict, accepting or rejecting,
is checked against an independent definition.
"""

from __future__ import annotations

import io
import random
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainstore.errors import InvalidKey, KeyNotFound, ServerError, WriteLocked
from chainstore.ring import NodeInfo, Ring, position
from chainstore.storage import STORE_NAMES
from client.errors import RequestTimedOut
from torture.checker import (
    LINEARIZABLE,
    LOST_WRITE,
    NO_FINAL_READ,
    NOT_LINEARIZABLE,
    PHANTOM_VALUE,
    REPLICA_DIFFERENT,
    REPLICA_MISSING,
    STRAY_KEY,
    UNDECIDED,
    check_all,
    check_history_linearizable,
    check_linearizable,
    check_no_lost_writes,
    check_replicas,
)
from torture.history import (
    DELETE,
    FAIL,
    GET,
    OK,
    PUT,
    UNKNOWN,
    History,
    Operation,
    classify_error,
)

K = b"k"


class Ops:
    """Hand-made histories: one line per operation, indices in order of writing."""

    def __init__(self) -> None:
        self.history = History()

    def _add(self, process, kind, value, start, end, outcome, missing=False, key=K):
        return self.history.append(Operation(process, kind, key, value, start,
                                             None if outcome == UNKNOWN else end, outcome,
                                             missing=missing))

    def put(self, p, value, start, end=None, outcome=OK, key=K):
        return self._add(p, PUT, value, start, end, outcome, key=key)

    def get(self, p, value, start, end, outcome=OK, key=K):
        return self._add(p, GET, value, start, end, outcome, key=key)

    def delete(self, p, start, end=None, outcome=OK, missing=False, key=K):
        return self._add(p, DELETE, None, start, end, outcome, missing, key=key)

    def ops(self):
        return self.history.operations()


def linearizable(ops, **options):
    result = check_linearizable(ops, **options)
    assert result.decided, result.explanation
    return result.ok


# -- the history ---------------------------------------------------------------------------------


def test_history_records_invocations_and_outcomes_with_its_clock():
    now = [10.0]
    history = History(clock=lambda: now[0])
    put = history.invoke(1, PUT, K, b"v1")
    get = history.invoke(2, GET, K)
    delete = history.invoke(3, DELETE, K)
    lost = history.invoke(4, PUT, K, b"v2")
    now[0] = 11.5
    history.complete(put, OK)
    history.complete(get, OK, b"v1")
    history.complete(delete, OK, missing=True)
    history.complete(lost, UNKNOWN)
    pending = history.invoke(5, GET, K, at=12.0)
    ops = history.operations()
    rows = [(o.index, o.kind, o.value, o.invoke, o.complete, o.outcome, o.missing) for o in ops]
    assert rows == [
        (0, PUT, b"v1", 10.0, 11.5, OK, False),
        (1, GET, b"v1", 10.0, 11.5, OK, False),
        (2, DELETE, None, 10.0, 11.5, OK, True),
        (3, PUT, b"v2", 10.0, None, UNKNOWN, False),
        (4, GET, None, 12.0, None, UNKNOWN, False),  # still pending: counts as unknown
    ]
    with pytest.raises(ValueError):
        history.complete(put, OK)  # already complete
    history.complete(pending, FAIL, at=13.0)
    assert history.operations()[4].outcome == FAIL


def test_history_refuses_malformed_operations():
    history = History()
    with pytest.raises(ValueError):
        history.invoke(1, PUT, K, at=0.0)  # a put needs a value
    with pytest.raises(ValueError):
        history.invoke(1, GET, K, b"x", at=0.0)
    with pytest.raises(ValueError):
        history.invoke(1, "cas", K, at=0.0)
    with pytest.raises(ValueError):
        history.invoke(1, GET, K)  # no clock and no time
    with pytest.raises(ValueError):
        Operation(1, GET, K, None, 2.0, 1.0, OK)  # completes before invocation
    with pytest.raises(ValueError):
        Operation(1, PUT, K, b"v", 0.0, 1.0, UNKNOWN)  # unknown has no complete time
    with pytest.raises(ValueError):
        Operation(1, GET, K, None, 0.0, 1.0, OK, missing=True)


def test_history_saves_and_loads_every_field_and_any_bytes():
    ops = Ops()
    ops.put(1, bytes(range(256)), 0.0, 1.0)
    ops.get(2, bytes(range(256)), 0.5, 1.5, key=b"\xffkey")
    ops.delete(3, 1.0, 2.0, missing=True)
    ops.put(4, b"\x00", 1.25, outcome=UNKNOWN)
    ops.get(5, None, 2.0, 3.0)
    ops.delete(6, 2.0, 2.5, outcome=FAIL)
    out = io.StringIO()
    ops.history.save(out)
    text = out.getvalue()
    assert len(text.splitlines()) == 6
    loaded = History.load(io.StringIO(text + "\n"))
    assert loaded.operations() == ops.ops()
    with pytest.raises(ValueError, match="line 1"):
        History.load(['{"kind": "put"}'])


def test_history_splits_by_key_keeping_order():
    ops = Ops()
    a1 = ops.put(1, b"a1", 0, 1, key=b"a")
    b1 = ops.put(1, b"b1", 1, 2, key=b"b")
    a2 = ops.get(2, b"a1", 2, 3, key=b"a")
    assert ops.history.by_key() == {b"a": [a1, a2], b"b": [b1]}


def test_classify_error():
    assert classify_error(GET, KeyNotFound("x"), single_attempt=False) == (OK, False)
    assert classify_error(DELETE, KeyNotFound("x"), single_attempt=False) == (OK, True)
    assert classify_error(PUT, InvalidKey("x"), single_attempt=False) == (FAIL, False)
    assert classify_error(PUT, WriteLocked("x"), single_attempt=True) == (FAIL, False)
    # A retrying client's last refusal says nothing about an earlier attempt that timed out.
    assert classify_error(PUT, WriteLocked("x"), single_attempt=False) == (UNKNOWN, False)
    assert classify_error(PUT, RequestTimedOut("x"), single_attempt=True) == (UNKNOWN, False)
    assert classify_error(DELETE, ServerError("x"), single_attempt=True) == (UNKNOWN, False)


# -- linearizability: hand-made histories ----------------------------------------------------------


def test_empty_and_sequential_histories_are_linearizable():
    assert linearizable([])
    ops = Ops()
    ops.get(1, None, 0, 1)
    ops.put(1, b"v1", 2, 3)
    ops.get(2, b"v1", 4, 5)
    ops.put(2, b"v2", 6, 7)
    ops.delete(1, 8, 9)
    ops.get(1, None, 10, 11)
    ops.delete(2, 12, 13, missing=True)
    ops.put(3, b"v3", 14, 15)
    ops.get(3, b"v3", 16, 17)
    result = check_linearizable(ops.ops())
    assert result.verdict == LINEARIZABLE and result.steps > 0


def test_concurrent_overlapping_history_is_linearizable():
    ops = Ops()
    ops.put(1, b"v1", 0, 10)
    ops.put(2, b"v2", 1, 9)
    ops.get(3, b"v2", 2, 3)   # v2 took effect first...
    ops.get(4, b"v1", 4, 5)   # ...then v1 overwrote it
    ops.get(5, b"v1", 11, 12)
    assert linearizable(ops.ops())


def test_stale_read_is_rejected_with_a_small_counterexample():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.get(2, b"v1", 1.5, 2)
    newer = ops.put(1, b"v2", 3, 4)
    for i in range(5):  # unrelated noise before the anomaly
        ops.get(2 + i, b"v2", 5 + i, 5.5 + i)
    stale = ops.get(3, b"v1", 11, 12)
    ops.put(2, b"v3", 13, 14)
    ops.get(2, b"v3", 15, 16)
    result = check_linearizable(ops.ops())
    assert result.verdict == NOT_LINEARIZABLE
    assert stale in result.operations
    assert len(result.operations) <= 3
    assert "Stale read" in result.explanation and f"#{newer.index}" in result.explanation


def test_read_of_a_value_never_written_is_rejected():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    bogus = ops.get(2, b"nobody wrote this", 2, 3)
    result = check_linearizable(ops.ops())
    assert not result.ok and result.operations == (bogus,)
    assert "no put wrote" in result.explanation


def test_read_of_a_refused_put_is_rejected_and_a_refused_put_changes_nothing():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    refused = ops.put(2, b"v2", 2, 3, outcome=FAIL)
    ops.get(1, b"v1", 4, 5)
    assert linearizable(ops.ops())
    read = ops.get(3, b"v2", 6, 7)
    result = check_linearizable(ops.ops())
    assert not result.ok and set(result.operations) == {read, refused}
    assert "refused" in result.explanation


def test_read_returning_a_value_before_its_put_was_invoked_is_rejected():
    ops = Ops()
    early = ops.get(1, b"v1", 0, 1)
    ops.put(2, b"v1", 2, 3)
    result = check_linearizable(ops.ops())
    assert not result.ok and early in result.operations
    assert "before any put" in result.explanation


def test_unknown_put_that_never_happened_is_fine():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, outcome=UNKNOWN)
    for i in range(4):
        ops.get(3, b"v1", 3 + i, 3.5 + i)
    assert linearizable(ops.ops())


def test_unknown_put_whose_value_is_read_later_is_fine():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, outcome=UNKNOWN)
    ops.get(3, b"v1", 3, 4)          # not applied yet...
    ops.get(3, b"v2", 100, 101)      # ...applied long after the client gave up
    assert linearizable(ops.ops())
    # But it takes effect once: v1 cannot come back after v2 was seen.
    ops.get(3, b"v1", 102, 103)
    assert not linearizable(ops.ops())


def test_unknown_put_cannot_take_effect_before_its_invocation():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.get(3, b"v2", 1.5, 1.8)
    ops.put(2, b"v2", 2, outcome=UNKNOWN)
    assert not linearizable(ops.ops())


def test_a_read_cannot_go_back_to_an_older_value():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, 20)         # slow, concurrent with both reads
    ops.get(3, b"v2", 3, 4)          # sees v2...
    ops.get(4, b"v1", 5, 6)          # ...then a later read sees the value before it
    assert not linearizable(ops.ops())
    # Overlapping reads may see the two in either order.
    ops2 = Ops()
    ops2.put(1, b"v1", 0, 1)
    ops2.put(2, b"v2", 2, 20)
    ops2.get(3, b"v2", 3, 6)
    ops2.get(4, b"v1", 5, 7)
    assert linearizable(ops2.ops())


def test_delete_semantics():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.delete(2, 2, 3)
    ops.get(1, None, 4, 5)
    ops.delete(2, 6, 7, missing=True)  # KeyNotFound: observed the key absent
    assert linearizable(ops.ops())

    resurrected = Ops()
    resurrected.put(1, b"v1", 0, 1)
    resurrected.delete(2, 2, 3)
    resurrected.get(1, b"v1", 4, 5)
    assert not linearizable(resurrected.ops())

    # KeyNotFound while the key surely held a value.
    not_found = Ops()
    not_found.put(1, b"v1", 0, 1)
    not_found.delete(2, 2, 3, missing=True)
    not_found.get(1, b"v1", 4, 5)
    assert not linearizable(not_found.ops())
    # Unless clients retry deletes: then KeyNotFound may answer a retry of a delete that did
    # apply, and says only that the key is absent afterwards (here the get contradicts that).
    assert not linearizable(not_found.ops(), delete_answers_observe=False)
    retried = Ops()
    retried.put(1, b"v1", 0, 1)
    retried.delete(2, 2, 3, missing=True)
    retried.get(1, None, 4, 5)
    assert not linearizable(retried.ops())
    assert linearizable(retried.ops(), delete_answers_observe=False)

    # An acknowledged delete removed a value: the key held one.
    empty = Ops()
    empty.delete(1, 0, 1)
    assert not linearizable(empty.ops())
    assert linearizable(empty.ops(), delete_answers_observe=False)
    assert linearizable(empty.ops(), initial=b"v0")

    # A delete of unknown outcome may or may not have happened; a refused one did not.
    maybe = Ops()
    maybe.put(1, b"v1", 0, 1)
    maybe.delete(2, 2, outcome=UNKNOWN)
    maybe.get(1, b"v1", 3, 4)
    maybe.get(1, None, 5, 6)
    assert linearizable(maybe.ops())
    refused = Ops()
    refused.put(1, b"v1", 0, 1)
    refused.delete(2, 2, 3, outcome=FAIL)
    refused.get(1, None, 5, 6)
    assert not linearizable(refused.ops())


def test_failed_and_unanswered_gets_constrain_nothing():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.get(2, None, 2, 3, outcome=FAIL)        # would contradict v1 if it counted
    ops.get(2, b"v0", 4, None, outcome=UNKNOWN)
    ops.get(2, b"v1", 5, 6)
    assert linearizable(ops.ops())


def test_touching_intervals_are_concurrent():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, 3)
    ops.get(3, b"v1", 3, 4)  # invoked exactly when v2's put completed: either order
    assert linearizable(ops.ops())
    late = Ops()
    late.put(1, b"v1", 0, 1)
    late.put(2, b"v2", 2, 3)
    late.get(3, b"v1", 3.5, 4)  # invoked after v2's put completed: must see v2
    assert not linearizable(late.ops())


def test_one_key_at_a_time_and_keys_are_independent():
    ops = Ops()
    ops.put(1, b"a1", 0, 1, key=b"a")
    ops.put(2, b"b1", 0, 1, key=b"b")
    ops.get(3, b"a1", 2, 3, key=b"a")
    ops.get(3, None, 2, 3, key=b"c")
    with pytest.raises(ValueError):
        check_linearizable(ops.ops())
    results = check_history_linearizable(ops.history)
    assert set(results) == {b"a", b"b", b"c"} and all(r.ok for r in results.values())
    ops.get(3, b"a1", 4, 5, key=b"b")  # b never held a1
    results = check_history_linearizable(ops.history)
    assert not results[b"b"].ok and results[b"a"].ok and results[b"b"].key == b"b"


def test_out_of_budget_is_undecided_not_a_verdict():
    history = _concurrent_history(random.Random(7), 400, 8, unknown=0.1)
    assert check_linearizable(history).ok
    # Cut short, the search looks for a failing window where it got stuck; on a linearizable
    # history it must find none (a window relaxes what came before it, never guesses).
    for seed in range(4):
        ops = _concurrent_history(random.Random(seed), 400, 8, unknown=0.1)
        for max_steps in (300, 1000, 3000, 10000):
            verdict = check_linearizable(ops, max_steps=max_steps).verdict
            assert verdict in (LINEARIZABLE, UNDECIDED), (seed, max_steps)
    result = check_linearizable(history, max_steps=50)
    assert result.verdict == UNDECIDED and not result.ok and not result.decided
    now = [0.0]

    def clock():
        now[0] += 1.0  # every look at the clock is a second later
        return now[0]

    result = check_linearizable(history, seconds=0.5, clock=clock)
    assert result.verdict == UNDECIDED


def test_a_window_relaxes_what_came_before_it():
    """White box: the local search (used when the whole search runs out of budget) checks the
    operations around one completion whatever the key held before them. A read that began
    before the window may have taken effect before it, and a put that completed before the
    window may be what the key held."""
    from torture import checker

    ops = Ops()
    ops.put(1, b"v1", 0, 0.5)
    ops.get(2, b"v1", 1, 5)    # long read, saw v1 before v2 was written
    ops.put(3, b"v2", 2, 2.5)
    ops.get(4, b"v2", 3, 4)
    ops.get(5, b"v2", 4.5, 6)
    assert linearizable(ops.ops())
    steps = checker._prepare(ops.ops(), checker._Values(), True)
    budget = checker._Budget(100_000, None, time.monotonic)
    for t in (0.5, 2.5, 4.0, 5.0, 6.0):
        assert checker._local(steps, 0, t, budget, None) is None, t
    ops.get(4, b"v1", 7, 8)    # now v1 comes back after v2 was read
    steps = checker._prepare(ops.ops(), checker._Values(), True)
    found = checker._local(steps, 0, 8.0, budget, None)
    assert found is not None and len(found[0]) <= 3


# -- linearizability: against a brute-force reference ----------------------------------------------


def brute_force_linearizable(ops, observe=True, initial=None):
    """Try every order of the answered operations and every subset of the unknown writes."""
    relevant = [o for o in ops
                if (o.kind == GET and o.outcome == OK) or (o.kind != GET and o.outcome != FAIL)]
    inf = float("inf")

    def end(o):
        return inf if o.complete is None else o.complete

    def apply(o, state):
        """The state after o, or the string 'no' if o cannot happen in this state."""
        if o.kind == PUT:
            return o.value
        if o.kind == GET:
            return state if state == o.value else "no"
        if o.outcome == OK and observe:
            if o.missing:
                return state if state is None else "no"
            return None if state is not None else "no"
        return None

    def search(left, state):
        mandatory = [o for o in left if o.outcome == OK]
        if not mandatory:
            return True
        for o in left:
            # o may go next only if nothing left had to come before it.
            if any(end(x) < o.invoke for x in left if x is not o):
                continue
            after = apply(o, state)
            if after != "no" and search([x for x in left if x is not o], after):
                return True
        return False

    return search(relevant, initial)


def _simulate(draw_or_rng, specs, observe=True):
    """Operations from (process, kind, invoke, duration, point, outcome, applied) specs, whose
    results come from a register applied at each operation's linearization point."""
    order = sorted(range(len(specs)), key=lambda i: (specs[i][4], i))
    state = None
    results = {}
    for i in order:
        process, kind, invoke, duration, point, outcome, applied = specs[i]
        if kind == PUT:
            if outcome == OK or (outcome == UNKNOWN and applied):
                state = b"v%d" % i
        elif kind == GET:
            results[i] = state
        else:
            results[i] = state is None  # missing
            if outcome == OK or (outcome == UNKNOWN and applied):
                state = None
    ops = []
    for i, (process, kind, invoke, duration, point, outcome, applied) in enumerate(specs):
        complete = None if outcome == UNKNOWN else invoke + duration
        if kind == PUT:
            ops.append(Operation(process, PUT, K, b"v%d" % i, invoke, complete, outcome, index=i))
        elif kind == GET:
            ops.append(Operation(process, GET, K, results[i], invoke, complete, outcome, index=i))
        else:
            missing = outcome == OK and results[i] and observe
            ops.append(Operation(process, DELETE, K, None, invoke, complete, outcome,
                                 missing=bool(missing), index=i))
    return ops


@st.composite
def valid_histories(draw, max_ops=6):
    """Small histories that a linearizable register produced (points inside the intervals)."""
    n = draw(st.integers(1, max_ops))
    specs = []
    for i in range(n):
        kind = draw(st.sampled_from([PUT, PUT, GET, GET, DELETE]))
        invoke = float(draw(st.integers(0, 12)))
        duration = float(draw(st.integers(0, 6)))
        point = invoke + duration * draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
        outcome = OK if kind == GET else draw(st.sampled_from([OK, OK, OK, UNKNOWN, FAIL]))
        applied = draw(st.booleans())
        specs.append((i % 3, kind, invoke, duration, point, outcome, applied))
    return _simulate(draw, specs)


@st.composite
def sequential_histories(draw):
    n = draw(st.integers(1, 30))
    specs = []
    for i in range(n):
        kind = draw(st.sampled_from([PUT, GET, GET, DELETE]))
        specs.append((0, kind, 2.0 * i, 1.0, 2.0 * i + 0.5, OK, True))
    return _simulate(draw, specs)


@settings(max_examples=150, deadline=None)
@given(sequential_histories())
def test_random_sequential_histories_are_linearizable(ops):
    assert linearizable(ops)


@settings(max_examples=300, deadline=None)
@given(valid_histories())
def test_random_concurrent_histories_of_a_register_are_linearizable(ops):
    assert brute_force_linearizable(ops)  # the generator is right...
    assert linearizable(ops)              # ...and so is the checker


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(valid_histories(), st.data())
def test_a_read_made_stale_is_rejected_exactly_when_no_order_explains_it(ops, data):
    reads = [i for i, o in enumerate(ops) if o.kind == GET and o.outcome == OK]
    older = [None] + [o.value for o in ops if o.kind == PUT]
    if not reads:
        return
    i = data.draw(st.sampled_from(reads))
    stale = data.draw(st.sampled_from(older))
    mutated = list(ops)
    mutated[i] = replace(ops[i], value=stale)
    expected = brute_force_linearizable(mutated)
    result = check_linearizable(mutated)
    assert result.decided
    assert result.ok == expected
    if not expected:
        assert result.operations and set(result.operations) <= set(mutated)


@settings(max_examples=300, deadline=None)
@given(valid_histories(), st.data(), st.integers(1, 80))
def test_a_verdict_found_past_the_search_budget_is_still_right(ops, data, max_steps):
    """Out of budget, the checker looks for a failing window of operations; such a window must
    be a real violation (the windows relax what came before them), never a guess."""
    reads = [i for i, o in enumerate(ops) if o.kind == GET and o.outcome == OK]
    if reads and data.draw(st.booleans()):
        i = data.draw(st.sampled_from(reads))
        stale = data.draw(st.sampled_from([None] + [o.value for o in ops if o.kind == PUT]))
        ops = [replace(o, value=stale) if j == i else o for j, o in enumerate(ops)]
    result = check_linearizable(ops, max_steps=max_steps)
    if result.decided:
        assert result.ok == brute_force_linearizable(ops)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([PUT, GET, DELETE]), st.integers(0, 8),
                          st.integers(0, 4), st.sampled_from([OK, OK, UNKNOWN, FAIL]),
                          st.integers(0, 3), st.booleans()), min_size=1, max_size=6),
       st.booleans())
def test_checker_agrees_with_brute_force_on_arbitrary_histories(rows, observe):
    ops = []
    for i, (kind, invoke, duration, outcome, value, missing) in enumerate(rows):
        complete = None if outcome == UNKNOWN else float(invoke + duration)
        if kind == PUT:
            written = b"v%d" % max(value, 1)
        elif kind == GET and value:
            written = b"v%d" % value
        else:
            written = None
        ops.append(Operation(i % 3, kind, K, written, float(invoke), complete, outcome,
                             missing=missing and kind == DELETE and outcome == OK, index=i))
    result = check_linearizable(ops, delete_answers_observe=observe)
    assert result.decided
    assert result.ok == brute_force_linearizable(ops, observe=observe)


# -- linearizability: size -------------------------------------------------------------------------


def _concurrent_history(rng, n, processes, unknown=0.05):
    """n operations over closed-loop processes on one key, from a simulated register."""
    specs = []
    for p in range(processes):
        t = rng.random()
        for _ in range(n // processes):
            duration = rng.expovariate(1.0) + 0.01
            kind = rng.choice([PUT, GET, GET, DELETE])
            outcome = UNKNOWN if kind != GET and rng.random() < unknown else OK
            specs.append((p, kind, t, duration, t + rng.random() * duration, outcome,
                          rng.random() < 0.5))
            t += duration + rng.expovariate(4.0)
    specs.sort(key=lambda s: s[2])
    return _simulate(rng, specs)


def test_two_thousand_operations_over_eight_processes_are_decided_within_a_step_budget():
    budget = 600_000
    for seed in range(3):
        ops = _concurrent_history(random.Random(seed), 2000, 8)
        assert len(ops) == 2000
        result = check_linearizable(ops, max_steps=budget)
        assert result.verdict == LINEARIZABLE, (seed, result.explanation)
        assert result.steps <= budget

        # One late read made stale: rejected, and the counterexample is local.
        rng = random.Random(seed)
        late = [i for i, o in enumerate(ops)
                if o.kind == GET and o.value is not None and i > 1500]
        i = rng.choice(late)
        overwritten = [o for o in ops if o.kind == PUT and o.outcome == OK
                       and o.complete < ops[i].invoke - 5 and o.value != ops[i].value]
        mutated = list(ops)
        mutated[i] = replace(ops[i], value=overwritten[-1].value)
        result = check_linearizable(mutated, max_steps=budget)
        assert result.verdict == NOT_LINEARIZABLE, (seed, result.explanation)
        assert mutated[i] in result.operations
        known = [o for o in result.operations if o.outcome != UNKNOWN]
        assert len(known) <= 20
        assert result.steps <= 2 * budget


# -- lost writes -----------------------------------------------------------------------------------


def test_no_lost_writes_when_the_last_write_is_read_back():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, 3)
    ops.put(1, b"x1", 0, 1, key=b"x")
    ops.delete(1, 2, 3, key=b"x")
    assert check_no_lost_writes(ops.history, {K: b"v2", b"x": None}) == []


def test_an_acknowledged_put_overwritten_by_nothing_later_is_lost():
    ops = Ops()
    old = ops.put(1, b"v1", 0, 1)
    lost = ops.put(2, b"v2", 2, 3)
    anomalies = check_no_lost_writes(ops.history, {K: b"v1"})
    assert [a.kind for a in anomalies] == [LOST_WRITE]
    assert anomalies[0].operations == (lost, old)
    assert "completed before" in anomalies[0].explanation


def test_a_write_that_may_follow_explains_the_final_value():
    ops = Ops()
    ops.put(1, b"v1", 0, 10)
    ops.put(2, b"v2", 2, 3)          # concurrent with v1: v1 may come last
    ops.put(3, b"v3", 4, outcome=UNKNOWN)
    ops.delete(1, 11, 12)            # then a delete: absent is right
    assert check_no_lost_writes(ops.history, {K: None}) == []
    assert check_no_lost_writes(ops.history, {K: b"v3"}) == []  # the unknown put, last
    assert [a.kind for a in check_no_lost_writes(ops.history, {K: b"v2"})] == [LOST_WRITE]


def test_an_acknowledged_delete_can_be_lost_and_refused_writes_do_not_count():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    deleted = ops.delete(2, 2, 3)
    ops.put(3, b"v2", 4, 5, outcome=FAIL)
    anomalies = check_no_lost_writes(ops.history, {K: b"v1"})
    assert [(a.kind, a.operations[0]) for a in anomalies] == [(LOST_WRITE, deleted)]
    anomalies = check_no_lost_writes(ops.history, {K: b"v2"})
    assert {a.kind for a in anomalies} == {PHANTOM_VALUE, LOST_WRITE}


def test_keys_without_a_final_read_are_reported_unchecked():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(1, b"u", 0, 1, key=b"unrelated", outcome=FAIL)
    assert [a.kind for a in check_no_lost_writes(ops.history, {})] == [NO_FINAL_READ]


# -- replicas --------------------------------------------------------------------------------------


def _ring(count=4, dead=()):
    nodes = tuple(NodeInfo(f"s{i}", "127.0.0.1", 5000 + i, 6000 + i) for i in range(count))
    return Ring(nodes, epoch=1, replication=3, dead=frozenset(dead))


def _consistent_dumps(ring, data):
    dumps = {(n.name, store): {} for n in ring.nodes for store in STORE_NAMES}
    for key, value in data.items():
        index = ring.owner_index(position(key))
        for place, node in enumerate(ring.ring_chain(index)):
            if node.name not in ring.dead:
                dumps[(node.name, STORE_NAMES[place])][key] = value
    return dumps


def test_replicas_in_agreement():
    ring = _ring()
    data = {b"key%d" % i: b"value%d" % i for i in range(40)}
    assert check_replicas(ring, _consistent_dumps(ring, data)) == []


def test_missing_key_on_the_tail_and_different_value_on_the_middle_are_reported():
    ring = _ring()
    data = {b"key%d" % i: b"value%d" % i for i in range(40)}
    dumps = _consistent_dumps(ring, data)
    chain = ring.ring_chain(ring.owner_index(position(b"key1")))
    tail = (chain[2].name, STORE_NAMES[2])
    del dumps[tail][b"key1"]
    middle = (chain[1].name, STORE_NAMES[1])
    chain7 = ring.ring_chain(ring.owner_index(position(b"key7")))
    middle7 = (chain7[1].name, STORE_NAMES[1])
    dumps[middle7][b"key7"] = b"stale"
    anomalies = check_replicas(ring, dumps)
    found = {(a.kind, a.key, a.where) for a in anomalies}
    assert found == {(REPLICA_MISSING, b"key1", (tail,)),
                     (REPLICA_DIFFERENT, b"key7", (middle7,))}
    assert middle != tail


def test_dead_members_are_skipped_and_strays_reported():
    ring = _ring(dead={"s2"})
    data = {b"key%d" % i: b"value%d" % i for i in range(40)}
    dumps = _consistent_dumps(ring, data)
    dumps[("s2", "coordinator")] = {b"key1": b"garbage"}  # a dead member's stale store
    assert check_replicas(ring, dumps) == []
    index = ring.owner_index(position(b"key3"))
    outsider = next(n.name for n in ring.nodes
                    if n.name not in ring.dead and n.name not in
                    {m.name for m in ring.ring_chain(index)})
    dumps[(outsider, "coordinator")][b"key3"] = b"value3"
    assert [(a.kind, a.key) for a in check_replicas(ring, dumps)] == [(STRAY_KEY, b"key3")]


def test_summary_counts_every_kind():
    ops = Ops()
    ops.put(1, b"v1", 0, 1)
    ops.put(2, b"v2", 2, 3)
    ops.get(3, b"v1", 4, 5)            # stale
    ops.put(1, b"x1", 0, 1, key=b"x")
    ring = _ring()
    dumps = _consistent_dumps(ring, {K: b"v2", b"x": b"x1"})
    chain = ring.ring_chain(ring.owner_index(position(b"x")))
    del dumps[(chain[0].name, STORE_NAMES[0])][b"x"]
    summary = check_all(ops.history, final_reads={K: b"v1", b"x": b"x1"}, ring=ring,
                        dumps=dumps)
    counts = summary.counts
    assert counts[NOT_LINEARIZABLE] == 1 and counts[LOST_WRITE] == 1
    assert counts[REPLICA_MISSING] == 1 and counts[UNDECIDED] == 0
    assert not summary.ok
    assert dict(summary.rows()) == counts and summary.details()
    clean = check_all(ops.history.operations()[:2], final_reads={K: b"v2"})
    assert clean.ok and not any(clean.counts.values())
