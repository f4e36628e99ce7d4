"""``python -m ddrs_ext``: the ddrs command line (ddrs.cli), under the library's name, for scripts
that start it that way (e.g. ``torchrun -m ddrs_ext``)."""

import sys

if __name__ == "__main__":
    from ddrs.cli import main

    sys.exit(main())
