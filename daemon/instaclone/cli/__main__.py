"""``python -m instaclone.cli``: the same as the ``instaclone`` command."""

import sys

from . import main

sys.exit(main())
