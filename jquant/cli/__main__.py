"""``python -m jquant.cli``: the ``jquant`` command."""

import sys

from jquant.cli import main

sys.exit(main())
