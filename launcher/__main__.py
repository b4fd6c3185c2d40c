"""``python -m launcher``: the embedded stack in the foreground (see ``launcher.stack``)."""

import sys

from launcher.stack import main

sys.exit(main())
