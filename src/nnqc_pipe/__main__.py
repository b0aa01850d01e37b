"""``python -m nnqc_pipe``: the same command line as ``nnqc-pipe``."""

import sys

from .cli import main

sys.exit(main())
