"""Drivers for the test guests: domain XML, boot and talk to them.

``devguest``: the fast busybox guest (``scripts/build-guest.sh``); ``debianguest``:
the real Debian 12 guest (``scripts/build-debian-guest.sh``). Used by the tests,
the demo and the benchmarks, never by the daemon (which does not ship them).
"""
