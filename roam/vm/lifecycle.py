"""A machine and its guest agent: the lifecycle `roam run`, `roam snapshot` and the peer
share, whatever the hypervisor.

Handles what every user did on its own before: the agent session after a resume
(retried, see roam.guest.client.fresh_session), a failing before_suspend hook (logged;
the suspend goes on, since the host is about to lose the machine either way), and device
state saved with the agent still connected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from roam.guest.client import ExecResult, GuestAgentError, GuestClient, fresh_session
from roam.hypervisor import Machine, Nic
from roam.storage.provider import Provider

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 60.0


@dataclass
class Resumed:
    """Milliseconds of a resume's phases, for benchmarks and reports."""

    load_state_ms: float
    cont_ms: float
    wall: float  # time.time() when the guest ran again


class VM:
    """`machine` (made by a driver, not started yet) and its agent session."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.agent: GuestClient | None = None

    async def boot(self, nic: Nic, ready_timeout: float) -> None:
        """Cold boot; returns once the guest agent says the workload is ready."""
        await self.machine.start(nic)
        self.agent = await self.machine.open_agent()
        await self.machine.guard(self.agent.wait_ready(ready_timeout))

    async def resume(self, state: Provider, nic: Nic) -> Resumed:
        """Start on saved device state, run, and attach the agent."""
        await self.machine.start_incoming(nic)
        resumed = await self.load_and_run(state)
        await self.attach_agent()
        return resumed

    async def load_and_run(self, state: Provider) -> Resumed:
        """Load the device state into a machine started incoming, and run it."""
        started = time.perf_counter()
        await self.machine.load_state(state)
        loaded = time.perf_counter()
        wall = await self.machine.resume()
        return Resumed((loaded - started) * 1000, (time.perf_counter() - loaded) * 1000, wall)

    async def attach_agent(self, timeout: float = AGENT_TIMEOUT) -> float:  # noqa: ASYNC109
        """A session with the agent of a resumed guest (roam.guest.client.fresh_session),
        and its after_resume hook. Returns when (time.time()) the agent first answered:
        the guest runs again (its liveness)."""
        self.agent = await self.machine.guard(fresh_session(self.machine.open_agent, timeout))
        answered = time.time()
        await self.machine.guard(self.agent.after_resume())
        return answered

    async def before_suspend(self) -> None:
        """The guest's before_suspend hook; a failure is logged, not raised."""
        if self.agent is None:
            return
        try:
            await self.machine.guard(self.agent.before_suspend())
        except GuestAgentError as exc:
            log.warning("before_suspend failed, suspending anyway: %s", exc)

    async def pause_and_save(self, state: Provider) -> int:
        """Pause and save the device state (agent still connected: see attach_agent)."""
        await self.machine.pause()
        return await self.machine.save_state(state)

    async def suspend(self, state: Provider) -> int:
        await self.before_suspend()
        return await self.pause_and_save(state)

    async def resume_paused(self) -> None:
        """Run a machine this host paused (a handover that did not happen)."""
        await self.machine.resume()
        if self.agent is not None:
            await self.machine.guard(self.agent.after_resume())

    async def exec(self, argv: list[str], timeout: float) -> ExecResult:  # noqa: ASYNC109
        if self.agent is None:
            raise GuestAgentError("the guest agent is not connected")
        return await self.agent.exec(argv, timeout=timeout)

    async def close(self) -> None:
        """Close the agent session and stop the machine."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        await self.machine.stop()
