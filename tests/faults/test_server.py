"""Server faults during the job request, the heartbeats and the final update.

A real pilot (in-process, real TLS and processes) talks to the dev server through the
fault proxy (``proxy.FaultProxy``), which breaks three requests of one call (two
final update attempts):

* HTTP 500 and HTTP 503 answers (the server never saw the request);
* a slow reply: forwarded, answered 3 s late, past the client's 2 s time-out for
  job requests and heartbeats (a final update's own time-out is longer);
* a truncated reply: forwarded, the reply cut in the middle of its body;
* a connection reset (RST) as the request arrives;
* a TLS error: the connection before is closed, the next ones speak no TLS.

The pilot's client makes two attempts per call here (0.1 s apart); a final update is
one attempt per call, repeated after 5 s, then 10 s.  A job request whose reply is
lost after the server dispatched the job is not repeated (it is not idempotent): the
job stays ``sent`` for the server's own time-out, as with a real PanDA server.
Heartbeats go out every 0.4 s in the heartbeat scenarios (a 3 s payload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..harness import run_to_end
from .proxy import Action, BreakTLS, Rule, Slow, Status, Truncate
from .proxy import Reset as ResetAction
from .scenario import FaultCase

#: Fault -> (its name, its text in the table for ``n`` requests, the action for ``n``).
FAULTS: dict[str, tuple[str, str, Callable[[int], Action]]] = {
    "500": ("HTTP 500", "HTTP 500 to {n} requests", lambda n: Status(500, b"Internal Server Error")),
    "503": ("HTTP 503", "HTTP 503 to {n} requests", lambda n: Status(503)),
    "slow": ("slow reply", "{n} replies 3 s late (time-out {timeout})", lambda n: Slow(3.0)),
    "truncated": ("truncated reply", "{n} replies cut mid-body", lambda n: Truncate()),
    "reset": ("connection reset", "connection reset (RST) at {n} requests", lambda n: ResetAction()),
    "tls": ("TLS error", "no TLS on {n} connections", BreakTLS),
}

#: Where each call's faults strike: (rule for the call, rule that arms a TLS fault before it).
CALLS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "job request": ({"call": "acquire_jobs"}, {"call": "schedconfig"}),
    # the first ``running`` update is the state change, heartbeats follow
    "heartbeat": (
        {"call": "update_job", "state": "running", "skip": 1},
        {"call": "update_job", "state": "running"},
    ),
    # with the default 30 min heartbeat, the call after ``running`` is the final update
    "final update": ({"call": "update_job", "state": "finished"}, {"call": "update_job", "state": "running"}),
}


#: Requests broken per call.  A final update makes one attempt per call and is repeated
#: after 5 s, 10 s, 20 s ...: two faults cost 15 s, three would cost 35 s.
COUNT = {"job request": 3, "heartbeat": 3, "final update": 2}


class ServerFaultTests(FaultCase):
    queue = "SERVER_FAULTS"
    group = "server"

    async def run_fault(self, fault: str, call: str) -> None:
        count = COUNT[call]
        name, text, make = FAULTS[fault]
        timeout = "120 s" if call == "final update" else "2 s"
        text, action = text.format(n=count, timeout=timeout), make(count)
        lost_reply = call == "job request" and fault in ("slow", "truncated")
        if lost_reply:
            expected = "job left sent (reply lost after dispatch; not repeated), no update"
        else:
            expected = "finished; 1 final update; outputs stored once"
        during = "heartbeats" if call == "heartbeat" else f"the {call}"
        self.scenario(f"{name} during {during}", text, call, expected)
        proxy = await self.start_proxy()
        match, arm = CALLS[call]
        tls = isinstance(action, BreakTLS)
        rule = proxy.add(Rule(**(arm if tls else match), action=action, times=1 if tls else count))
        heartbeats = call == "heartbeat"
        script = "sleep 3; echo result > out.dat" if heartbeats else "echo result > out.dat"
        (panda_id,) = await self.server.submit(self.job(script))
        settings: dict[str, Any] = {"heartbeat_period": 0.4} if heartbeats else {}
        service = self.pilot(client_timeout=2.0, **settings)
        await run_to_end(service)
        view: Any = await self.server.job(panda_id)
        delivered = [u for u in view["updates"] if u["state"] == "running"]
        notes = f"faults applied: {proxy.broken_connections if tls else rule.applied}"
        if heartbeats:
            notes += f"; running updates received: {len(delivered)}"
        if lost_reply:
            updates = [u["state"] for u in view["updates"]]
            await self.verdict(
                panda_id,
                state="sent",
                final_updates=0,
                checks=[(updates == [], f"updates for a job the pilot never got: {updates}")],
                notes=notes,
            )
        else:
            await self.verdict(
                panda_id,
                state="finished",
                outputs={"out.dat": b"result\n", "job.log.tgz": None},
                notes=notes,
            )

    async def test_500_during_the_job_request(self) -> None:
        await self.run_fault("500", "job request")

    async def test_500_during_heartbeats(self) -> None:
        await self.run_fault("500", "heartbeat")

    async def test_500_during_the_final_update(self) -> None:
        await self.run_fault("500", "final update")

    async def test_503_during_the_job_request(self) -> None:
        await self.run_fault("503", "job request")

    async def test_503_during_heartbeats(self) -> None:
        await self.run_fault("503", "heartbeat")

    async def test_503_during_the_final_update(self) -> None:
        await self.run_fault("503", "final update")

    async def test_slow_reply_to_the_job_request(self) -> None:
        await self.run_fault("slow", "job request")

    async def test_slow_replies_to_heartbeats(self) -> None:
        await self.run_fault("slow", "heartbeat")

    async def test_slow_reply_to_the_final_update(self) -> None:
        await self.run_fault("slow", "final update")

    async def test_truncated_reply_to_the_job_request(self) -> None:
        await self.run_fault("truncated", "job request")

    async def test_truncated_replies_to_heartbeats(self) -> None:
        await self.run_fault("truncated", "heartbeat")

    async def test_truncated_reply_to_the_final_update(self) -> None:
        await self.run_fault("truncated", "final update")

    async def test_reset_during_the_job_request(self) -> None:
        await self.run_fault("reset", "job request")

    async def test_reset_during_heartbeats(self) -> None:
        await self.run_fault("reset", "heartbeat")

    async def test_reset_during_the_final_update(self) -> None:
        await self.run_fault("reset", "final update")

    async def test_tls_error_at_the_job_request(self) -> None:
        await self.run_fault("tls", "job request")

    async def test_tls_error_at_heartbeats(self) -> None:
        await self.run_fault("tls", "heartbeat")

    async def test_tls_error_at_the_final_update(self) -> None:
        await self.run_fault("tls", "final update")
