"""``python -m dsproxy`` = the ``dsproxy`` command."""

import sys

from .cli import main

sys.exit(main())
