import itertools

import pytest

from instaclone.errors import StateError
from instaclone.states import HAPPY_PATH, TRANSITIONS, State, StateHistory, require


def test_happy_path_is_allowed():
    for a, b in itertools.pairwise(HAPPY_PATH):
        require(a, b)


def test_every_non_terminal_state_can_fail():
    for s in State:
        if not s.terminal:
            assert State.FAILED in TRANSITIONS[s]
            assert State.NEEDS_ATTENTION in TRANSITIONS[s]


def test_terminal_states_are_final():
    for s in (State.UNSTUNNED, State.FAILED, State.NEEDS_ATTENTION):
        assert s.terminal
        assert not TRANSITIONS[s]


@pytest.mark.parametrize("a,b", [
    (State.REQUESTED, State.CONFIGURED),
    (State.STUNNED, State.STUNNED),
    (State.UNSTUNNED, State.FAILED),
    (State.MEMORY_LINKED, State.CLONE_DELTA_CREATED),
])
def test_illegal_transitions_raise(a, b):
    with pytest.raises(StateError):
        require(a, b)


def test_frozen_source_skips_stun():
    require(State.REQUESTED, State.SOURCE_DELTA_CREATED)


def test_history_durations():
    h = StateHistory()
    h.advance(State.REQUESTED, at=10.0)
    h.advance(State.STUNNED, at=10.5)
    h.advance(State.SOURCE_DELTA_CREATED, at=10.75)
    assert h.current is State.SOURCE_DELTA_CREATED
    assert h.durations_ms() == {"Stunned": 500.0, "SourceDeltaCreated": 250.0}
    with pytest.raises(StateError):
        h.advance(State.REQUESTED)
