"""``python -m lptfl`` is the ``lptfl`` command."""

import sys

from lptfl.cli import main

sys.exit(main())
