"""``python -m client``: the same as the ``jumpout-client`` script."""

import sys

from client.main import main

sys.exit(main())
