"""Shared helper code for the tests: fakes, real-VM and daemon-process helpers, the test guests' drivers.

Not test modules: nothing here is collected, and tests import from here (never from
another test module or a conftest). Fixtures live in the ``conftest.py`` of the tier
that uses them (``tests/unit/conftest.py``, ``tests/integration/conftest.py``, ...).
"""
