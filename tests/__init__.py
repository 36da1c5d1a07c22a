"""The test suite.

``tests/thirdparty`` holds a backend packaged as a third party would ship it
(a module and its ``.dist-info`` with the entry point): it goes on
``sys.path`` here, in the package itself rather than in a conftest, so that
every process that imports anything of ``tests`` finds it by entry point,
the contract suite's child processes (``tests.support.contract.child``) included.
"""

from __future__ import annotations

import sys
from pathlib import Path

THIRD_PARTY = str(Path(__file__).resolve().parent / "thirdparty")
if THIRD_PARTY not in sys.path:
    sys.path.append(THIRD_PARTY)
