"""``python -m jumpout``: see :mod:`jumpout.cli`."""

import sys

from jumpout.cli import main

if __name__ == "__main__":
    sys.exit(main())
