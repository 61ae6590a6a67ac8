"""``python -m layerfuse`` runs the CLI."""

import sys

from layerfuse.cli import main

sys.exit(main())
