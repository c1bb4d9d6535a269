"""The worker's core: its decisions as a state machine with no I/O (no Redis, no asyncio).

``messages`` are the events in and instructions out, ``machine`` the state machine of one
invocation, ``hooks`` the optimizations' runtime hooks in their order, ``run`` the run as
the core sees it. The I/O shell around it is ``dagkube.runtime.worker``.
"""
