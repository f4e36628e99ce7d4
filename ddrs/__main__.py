"""``python -m ddrs``: the ddrs command line (ddrs.cli)."""

import sys

if __name__ == "__main__":
    try:
        from ddrs.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python starts: no traceback
        sys.exit(130)
    sys.exit(main())
