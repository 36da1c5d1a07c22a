"""libvirt errors, translated by code into :mod:`instaclone.errors` (in this one place)."""

from __future__ import annotations

import re

from ..errors import DomainExists, DomainNotFound, DomainStateInvalid, LibvirtError, LibvirtTimeout, LibvirtUnavailable
from . import _libvirt as lv

_NOT_FOUND = {lv.VIR_ERR_NO_DOMAIN}
_EXISTS = {lv.VIR_ERR_DOM_EXIST}
_STATE = {lv.VIR_ERR_OPERATION_INVALID}
_TIMEOUT = {lv.VIR_ERR_OPERATION_TIMEOUT, lv.VIR_ERR_AGENT_UNRESPONSIVE}
_CONNECTION = {lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_INVALID_CONN, lv.VIR_ERR_RPC, lv.VIR_ERR_SYSTEM_ERROR}

#: Messages of a connection that libvirtd closed.
_LOST = re.compile(r"Broken pipe|client socket is closed|Cannot write data|Cannot recv data|"
                   r"End of file while reading|Connection reset|connection closed", re.I)
#: ... of those, the ones that mean the request was not sent at all.
_NOT_SENT = re.compile(r"Cannot write data|client socket is closed|Broken pipe", re.I)


def translate(exc: lv.RawLibvirtError, action: str) -> LibvirtError:
    """Map a libvirtError to our error tree by its code."""
    code = exc.get_error_code()
    msg = f"{action}: {exc.get_error_message() or exc}"
    if code in _NOT_FOUND:
        return DomainNotFound(msg, libvirt_code=code)
    if code in _EXISTS:
        return DomainExists(msg, libvirt_code=code)
    if code in _STATE:
        return DomainStateInvalid(msg, libvirt_code=code)
    if code in _TIMEOUT:
        return LibvirtTimeout(msg, libvirt_code=code)
    if code in _CONNECTION:
        return LibvirtUnavailable(msg, libvirt_code=code)
    if code == lv.VIR_ERR_OPERATION_FAILED and "already exists" in msg:
        return DomainExists(msg, libvirt_code=code)
    return LibvirtError(msg, libvirt_code=code)


def connection_lost(exc: lv.RawLibvirtError) -> bool:
    """True if ``exc`` says the connection to libvirtd is gone (not that the call failed)."""
    code = exc.get_error_code()
    msg = exc.get_error_message() or ""
    if code in (lv.VIR_ERR_RPC, lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_INVALID_CONN):
        return True
    return code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_INTERNAL_ERROR) and bool(_LOST.search(msg))


def never_sent(exc: lv.RawLibvirtError) -> bool:
    """True if the failed request cannot have reached libvirtd (so sending it again is safe)."""
    return bool(_NOT_SENT.search(exc.get_error_message() or ""))
