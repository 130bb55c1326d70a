"""``python -m stream.cli``: the same as the ``gruflow`` command (tests and tools start workers this way)."""

import sys

from stream.cli import main

sys.exit(main())
