"""``python -m dagkube.cli``: the command line, named as the installed ``dagkube`` script."""

from dagkube.cli import main

main(prog_name="dagkube")
