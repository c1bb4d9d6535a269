"""Group commit of a bound worker's overlapped COMPLETE steps.

A bound worker starts its next ready task while the step of the one before is under way.
When tasks end faster than a step's round trip, the steps that end meanwhile wait for the one
under way and then go together in one call: a packed fan-out of tiny tasks costs one call
per group, not one per task. :class:`GroupCommit` holds that bookkeeping apart from the
I/O shell (``serving.py``) so it can be tested on its own: the steps waiting, the one task
that sends them in order, and the events of those that landed, kept for the worker's core in
the order the steps were added.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

StepT = TypeVar("StepT")
EventT = TypeVar("EventT")


class GroupCommit(Generic[StepT, EventT]):
    """``send(steps)`` carries out one call for ``steps`` (in order) and gives one event per
    step. At most one call is under way; the steps added meanwhile wait and go together in
    the next. A group of ``max_steps`` steps, or whose ``size`` adds up to more than
    ``max_bytes`` (what the worker may hold of outputs not sent yet), is waited for by
    :meth:`add`."""

    def __init__(
        self,
        send: Callable[[list[StepT]], Awaitable[list[EventT]]],
        *,
        max_steps: int,
        max_bytes: int,
        size: Callable[[StepT], int],
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be at least 1")
        self._send: Callable[[list[StepT]], Awaitable[list[EventT]]] | None = send
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self._size = size
        self.waiting: list[StepT] = []  # added, not sent yet
        self._landed: list[EventT] = []  # their events, not taken yet
        self._sender: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """A call is under way (or steps wait for one)."""
        return self._sender is not None and not self._sender.done()

    async def add(self, step: StepT) -> None:
        """Send ``step`` now if no call is under way, else with the others that wait for it;
        return at once unless the group waiting is full (then once it has been sent)."""
        self.waiting.append(step)
        if not self.busy:
            if self._sender is not None:
                self._sender.result()  # a call that failed fails this step too
            self._sender = asyncio.create_task(self._send_waiting())
        held = sum(self._size(s) for s in self.waiting)
        if len(self.waiting) >= self.max_steps or held > self.max_bytes:
            await self.drain()

    async def _send_waiting(self) -> None:
        while self.waiting:
            if self._send is None:
                raise RuntimeError("steps added to a group commit that was closed")
            steps, self.waiting = self.waiting, []
            events = await self._send(steps)
            if len(events) != len(steps):
                raise AssertionError(f"{len(steps)} steps sent, {len(events)} events back")
            # (bound after the await: the core may have taken the list meanwhile)
            self._landed.extend(events)

    def take(self) -> list[EventT]:
        """The events of the steps that landed since the last take, in order. A call that
        failed raises here (its steps' fate is unknown: the invocation fails)."""
        sender = self._sender
        if sender is not None and sender.done():
            self._sender = None
            sender.result()
        landed, self._landed = self._landed, []
        return landed

    async def drain(self) -> None:
        """Wait until every step added has been sent (a cancelled caller leaves the call
        to land)."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)

    def take_waiting(self) -> list[StepT]:
        """After :meth:`drain`: the steps added but not sent (none, unless a call failed),
        for a caller that sends them itself with a step of its own."""
        steps, self.waiting = self.waiting, []
        return steps

    async def close(self) -> BaseException | None:
        """Let a call under way land; the error it raised, if any (nothing is taken). The
        ``send`` function is let go: it usually holds its owner (a cycle that would keep an
        ended run's values until the cyclic collector ran)."""
        sender = self._sender
        try:
            if sender is None:
                return None
            await asyncio.wait([sender])
            return None if sender.cancelled() else sender.exception()
        finally:
            self._send = None
