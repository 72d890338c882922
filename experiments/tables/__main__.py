"""``python -m experiments.tables``: the command line of `experiments.tables.cli`."""

import sys

if __name__ == "__main__":
    from fedsp import hostalloc

    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    from experiments.tables.cli import main

    sys.exit(main())
