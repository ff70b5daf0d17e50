"""``python -m pyroflows``: the command line (``pyroflows.cli``)."""

import sys

from .cli import main

sys.exit(main())
