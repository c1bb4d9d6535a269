"""Entry point of the worker agent: ``python -m dagkube.worker`` (see dagkube.runtime.worker)."""

import sys

from dagkube.runtime.worker import main

if __name__ == "__main__":
    sys.exit(main())
