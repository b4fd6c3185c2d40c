"""``python -m worker``: the embedded stack (see ``worker.launcher``)."""

import sys

from worker.launcher import main

sys.exit(main())
