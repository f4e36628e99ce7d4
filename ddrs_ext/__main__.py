"""``python -m ddrs_ext``: the ``ddrs`` command line (see ``ddrs_ext.cli``)."""

import sys

from ddrs_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
