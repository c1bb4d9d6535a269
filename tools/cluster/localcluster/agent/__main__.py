import sys
from pathlib import Path

from localcluster.agent.node import main

main(Path(sys.argv[1]))
