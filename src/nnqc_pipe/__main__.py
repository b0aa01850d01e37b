"""``python -m nnqc_pipe``: the same command line as ``nnqc-pipe``."""

import sys

from nnqc_pipe.cli import main

sys.exit(main())
