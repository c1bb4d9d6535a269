"""A serialized value kept in parts: the pickle and its out-of-band buffers, not joined.

Joining a large value's parts costs a copy into fresh memory (16 MiB: about 15 ms on a 2-core
VM, most of it page faults), and where the value goes to the object store nothing needs it
joined: the parts are written one after the other. Redis needs one string: there it is joined
(``bytes(frames)``) where it is sent.
"""

from __future__ import annotations

from collections.abc import Iterable


class Frames:
    """The parts of one serialized value, in order; ``len`` is the joined size."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Iterable[bytes | memoryview]) -> None:
        self.parts = tuple(memoryview(part).cast("B") for part in parts)
        self.nbytes = sum(part.nbytes for part in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def startswith(self, prefix: bytes) -> bool:
        return bytes(self.parts[0][: len(prefix)]) == prefix if self.parts else not prefix


Serialized = bytes | Frames  # what serialize returns


def joined(value: Serialized) -> bytes:
    """``value`` as one bytes string (a no-op for bytes)."""
    return value if isinstance(value, bytes) else bytes(value)
