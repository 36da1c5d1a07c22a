"""Checked by mypy, never run: the real hypervisor and the tests' fake satisfy the Protocol.

tests/unit/hv/test_hv_protocol.py runs ``mypy --strict`` on this module; a method
missing from either class, or a signature that drifted, fails that test.
"""

from __future__ import annotations

from instaclone.hv import Hypervisor, LibvirtHypervisor

from .fakes import FakeHypervisor


def real(hv: LibvirtHypervisor) -> Hypervisor:
    return hv


def fake(hv: FakeHypervisor) -> Hypervisor:
    return hv
