"""The job state machine and its one transition table."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.errors import JobErrors
from pilot.job.states import (
    HEARTBEAT_STATE,
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    JobLifecycle,
    JobPhase,
    final_server_state,
)
from pilot.model.states import ServerState

P, S = JobPhase, ServerState


class TransitionTableTests(SynchronousTestCase):
    def test_the_happy_path_sends_starting_running_finished(self) -> None:
        life = JobLifecycle(1, Clock())
        sent = [life.advance(p) for p in (P.SETUP, P.STAGEIN, P.RUNNING, P.STAGEOUT, P.FINISHED)]
        self.assertEqual(sent, [S.STARTING, None, S.RUNNING, None, S.FINISHED])
        self.assertTrue(life.is_terminal)

    def test_every_non_terminal_phase_may_fail(self) -> None:
        for phase in P:
            if phase in TERMINAL:
                continue
            self.assertEqual(TRANSITIONS[(phase, P.FAILED)], S.FAILED)

    def test_impossible_transitions_raise(self) -> None:
        for start in P:
            for end in P:
                if (start, end) in TRANSITIONS:
                    continue
                life = JobLifecycle(1, Clock())
                life.phase = start
                self.assertRaises(InvalidTransition, life.advance, end)
        self.assertFalse([key for key in TRANSITIONS if key[0] in TERMINAL], "terminal phases allow nothing")

    def test_heartbeat_states(self) -> None:
        self.assertEqual(HEARTBEAT_STATE[P.STAGEIN], S.STARTING)
        self.assertEqual(HEARTBEAT_STATE[P.RUNNING], S.RUNNING)
        self.assertNotIn(P.FINISHED, HEARTBEAT_STATE)

    def test_final_state(self) -> None:
        errors = JobErrors()
        self.assertEqual(final_server_state(P.FINISHED, errors), S.FINISHED)
        errors.record(ErrorCode.STAGEOUTFAILED, "put failed")
        self.assertEqual(final_server_state(P.FAILED, errors), S.HOLDING, "recoverable: the server may retry")
        self.assertEqual(
            final_server_state(P.FAILED, errors, stored_files=True),
            S.FAILED,
            "a holding update's report is dropped: a stored log must go with a failed one",
        )
        other = JobErrors()
        other.record(ErrorCode.PAYLOADEXECUTIONFAILURE)
        self.assertEqual(final_server_state(P.FAILED, other), S.FAILED)

    def test_durations_on_the_clock(self) -> None:
        clock = Clock()
        life = JobLifecycle(1, clock)
        life.advance(P.SETUP)
        clock.advance(2)
        life.advance(P.STAGEIN)
        clock.advance(3)
        life.advance(P.RUNNING)
        self.assertEqual(life.duration(P.SETUP, P.STAGEIN), 2)
        self.assertEqual(life.duration(P.SETUP, P.RUNNING), 5)
        self.assertEqual(life.duration(P.RUNNING, P.FINISHED), 0.0)
