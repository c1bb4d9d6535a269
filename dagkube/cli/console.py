"""Where the command line meets the terminal: its two consoles, its exit codes, and the one
place that turns an error into a line of text and an exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

from dagkube.errors import DagkubeError, InvalidOption, InvalidWorkflow, RedisUnavailable
from dagkube.loader import WorkflowFileError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143

# Piped output is read by tools and tests: never wrap messages, and give tables room.
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. from `timeout` or a process manager): stop as Ctrl-C does."""


def on_sigterm(_signum: int, _frame: object) -> None:
    """The SIGTERM handler: unwind as Ctrl-C does, so every worker and server is stopped."""
    raise Terminated()


@contextlib.contextmanager
def handled_errors() -> Iterator[None]:
    """Turn dagkube errors into one clear line and an exit code, never a traceback (but the
    frames of the user's own code when their workflow file raised)."""
    try:
        yield
    except RedisUnavailable as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_REDIS)
    except (InvalidOption, InvalidWorkflow) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        if isinstance(exc, WorkflowFileError) and exc.user_frames:
            err.print("In your code (most recent call last):")
            err.print(exc.user_frames.rstrip("\n"), markup=False)
        sys.exit(EXIT_BAD_INPUT)
    except DagkubeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as exc:
        stopped_by = "terminated" if isinstance(exc, Terminated) else "interrupted"
        err.print(f"[yellow]{stopped_by}:[/] the run was cancelled and its workers stopped")
        sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
