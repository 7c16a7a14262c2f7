"""``python -m kubedistill ...`` is the ``kubedistill`` command (e.g. ``python -m kubedistill operator``)."""

import sys

from kubedistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
