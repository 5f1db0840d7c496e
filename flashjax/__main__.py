"""``python -m flashjax``: the command line."""

import sys

from flashjax.cli import main

sys.exit(main())
