"""Invocations: the unit of work queued per resource class and taken by a worker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Invocation:
    """(run, logical worker or flexible, class, root tasks). ``resume``: re-queued from a lost
    worker, so the taker must first look at what is already done."""

    run: str
    mem: int
    roots: list[str] = field(default_factory=list)
    worker: str | None = None
    queued_at: float = 0.0
    resume: bool = False
    retire: bool = False  # not work: asks the idle worker that takes it to exit
    # OOM kills of earlier takers ({"task", "mem", "peak"}), written by the REQUEUE script:
    # the task then runs one class up and its record keeps the attempts.
    escalations: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        body: dict = {
            "run": self.run,
            "mem": self.mem,
            "roots": self.roots,
            "queued_at": self.queued_at,
        }
        if self.worker is not None:
            body["worker"] = self.worker
        if self.resume:
            body["resume"] = True
        if self.retire:
            body["retire"] = True
        if self.escalations:
            body["escalations"] = self.escalations
        return json.dumps(body)

    @staticmethod
    def from_json(raw: bytes | str) -> Invocation:
        body = json.loads(raw)
        roots = body.get("roots") or []
        return Invocation(
            run=body["run"],
            mem=int(body["mem"]),
            # cjson encodes an empty Lua table as {}; it is an empty list of roots
            roots=list(roots) if isinstance(roots, list) else [],
            worker=body.get("worker"),
            queued_at=float(body.get("queued_at", 0.0)),
            resume=bool(body.get("resume", False)),
            retire=bool(body.get("retire", False)),
            escalations=list(body.get("escalations") or [])
            if isinstance(body.get("escalations"), list)
            else [],
        )
