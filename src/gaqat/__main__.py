"""``python -m gaqat``: the same command as ``gaqat`` (what ``torchrun -m gaqat`` needs)."""

import sys

from gaqat.cli import main

sys.exit(main())
