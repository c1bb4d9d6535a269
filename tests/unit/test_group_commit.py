"""Group commit of overlapped COMPLETE steps (dagkube.runtime.groupcommit), with a call whose
round trip the test controls."""

from __future__ import annotations

import asyncio

import pytest

from dagkube.runtime.groupcommit import GroupCommit


class Calls:
    """A stand-in for COMPLETE: each call waits until the test lets it land."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.fail = False

    async def send(self, steps: list[str]) -> list[str]:
        self.sent.append(list(steps))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail:
            raise ConnectionError("lost")
        return [f"done:{step}" for step in steps]

    async def land(self, n: int) -> None:
        """Let call ``n`` land, and the task sending it go on."""
        while len(self.gates) <= n:
            await asyncio.sleep(0)
        self.gates[n].set()
        for _ in range(5):
            await asyncio.sleep(0)


def group_of(calls: Calls, *, max_steps: int = 64, max_bytes: int = 1 << 20) -> GroupCommit:
    return GroupCommit(calls.send, max_steps=max_steps, max_bytes=max_bytes, size=len)


async def test_steps_added_while_a_call_is_under_way_go_together_and_land_in_order():
    calls = Calls()
    group = group_of(calls)
    await group.add("a")
    await asyncio.sleep(0)
    await group.add("b")
    await group.add("c")
    assert calls.sent == [["a"]] and group.waiting == ["b", "c"]
    assert group.take() == []  # nothing landed yet: taking now loses nothing later
    await calls.land(0)
    assert calls.sent == [["a"], ["b", "c"]]  # sent as soon as the first landed
    assert group.take() == ["done:a"]
    await group.add("d")  # while b and c are under way
    await calls.land(1)
    await calls.land(2)
    await group.drain()
    assert calls.sent == [["a"], ["b", "c"], ["d"]]
    assert group.take() == ["done:b", "done:c", "done:d"]
    assert not group.busy and group.take_waiting() == []


async def test_events_that_land_while_the_core_takes_others_are_kept():
    """The core takes what landed at every task's end, while a call may be under way."""
    calls = Calls()
    group = group_of(calls)
    await group.add("a")
    await asyncio.sleep(0)
    await group.add("b")
    taken: list[str] = []
    for n in range(2):
        taken += group.take()
        await calls.land(n)
        taken += group.take()
    assert taken == ["done:a", "done:b"]


async def test_a_full_group_is_waited_for():
    calls = Calls()
    group = group_of(calls, max_steps=2)
    await group.add("a")
    await asyncio.sleep(0)
    await group.add("b")
    adding = asyncio.create_task(group.add("c"))  # two wait: the worker waits for them
    await asyncio.sleep(0)
    assert not adding.done()
    await calls.land(0)
    await calls.land(1)
    await adding
    assert calls.sent == [["a"], ["b", "c"]]
    assert group.take() == ["done:a", "done:b", "done:c"]


async def test_outputs_held_past_the_byte_bound_are_waited_for():
    calls = Calls()
    group = group_of(calls, max_bytes=10)
    await group.add("x" * 4)
    await asyncio.sleep(0)
    await group.add("y" * 6)  # 6 bytes wait: within the bound
    adding = asyncio.create_task(group.add("z" * 5))  # 11 bytes would wait
    await asyncio.sleep(0)
    assert not adding.done()
    await calls.land(0)
    await calls.land(1)
    await adding
    assert len(group.take()) == 3


async def test_a_call_that_fails_fails_the_next_take_add_or_drain():
    def failing() -> tuple[Calls, GroupCommit]:
        calls = Calls()
        calls.fail = True
        return calls, group_of(calls)

    calls, group = failing()
    await group.add("a")
    await calls.land(0)
    with pytest.raises(ConnectionError):
        group.take()
    calls, group = failing()
    await group.add("a")
    await calls.land(0)
    with pytest.raises(ConnectionError):
        await group.add("b")
    calls, group = failing()
    await group.add("a")
    draining = asyncio.create_task(group.drain())
    await calls.land(0)
    with pytest.raises(ConnectionError):
        await draining
    assert isinstance(await group.close(), ConnectionError)


async def test_close_lets_a_call_under_way_land():
    calls = Calls()
    group = group_of(calls)
    await group.add("a")
    closing = asyncio.create_task(group.close())
    await asyncio.sleep(0)
    assert not closing.done()
    await calls.land(0)
    assert await closing is None
    assert group.take() == ["done:a"]


def test_a_group_needs_room_for_a_step():
    with pytest.raises(ValueError, match="max_steps=0 must be at least 1"):
        GroupCommit(Calls().send, max_steps=0, max_bytes=1, size=len)


async def test_close_lets_go_of_the_send_function():
    """``send`` is usually a method of the group's owner: a cycle through it would keep an
    ended run's values alive until the cyclic collector ran."""
    calls = Calls()
    group = group_of(calls)
    await group.add("a")
    closing = asyncio.create_task(group.close())
    await calls.land(0)
    assert await closing is None
    assert group._send is None
    with pytest.raises(RuntimeError, match="closed"):
        await group.add("b")
        await group.drain()
