"""``python -m imlnet``: the ``imlnet`` command (for environments without the console script)."""

import sys

from imlnet.cli import main

sys.exit(main())
