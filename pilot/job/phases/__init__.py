"""The phases of a job, in order: setup, stage-in, execute, stage-out, finish.

Each phase is a small object over a ``JobContext`` with one ``async run()``; the
orchestrator (``pilot.job.pipeline``) runs them in order and turns their failures
into the job's error.  A phase never starts a process or a request once the job has
been aborted (``JobContext.control.check``).
"""
