"""Access control opened to every caller, for API tests over TCP (TCP peers have no SO_PEERCRED)."""

from __future__ import annotations

from instaclone.api.access import Access, Caller, Peer


class OpenAccess(Access):
    """Every caller may do everything, as an admin (the test talks TCP: no peer credentials)."""

    def allows(self, peer: Peer | None, *, write: bool) -> bool:
        return True

    def caller(self, peer: Peer | None) -> Caller:
        return Caller(uid=None, admin=True)
