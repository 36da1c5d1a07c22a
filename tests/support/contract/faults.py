"""Fault injection at every backend call: a counting proxy over the hypervisor, wrapped backend methods.

A *call* is one call of a public method of the hypervisor object that the
engine and the backends share (layer ``hv``), or of a storage or memory
backend's contract method (layers ``storage``, ``memory``), made while an
operation runs. Each call is named by a :class:`Point`: its layer, method,
the domain it is about and which occurrence of that triple it is. Points
do not depend on how the calls of parallel clone starts interleave.

A :class:`Fault` fires once, at one point, ``before`` the call (nothing
happens; for ``hv``: libvirt refused) or ``after`` it (it took effect, then
the caller got an error: a lost reply, a timeout). It either raises
:class:`InjectedFault` (live rollback) or SIGKILLs the process (crash, then
recovery by a new engine).
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from instaclone.errors import LibvirtError

from . import harness

LAYERS = ("hv", "storage", "memory")
PHASES = ("before", "after")


class InjectedFault(LibvirtError):
    """The error a fault raises: what a failing libvirt call raises."""


@dataclass(frozen=True)
class Point:
    layer: str  # hv | storage | memory
    method: str
    target: str  # the domain the call is about, "" if none
    k: int  # the k-th call of (layer, method, target) in the operation, from 1

    def label(self) -> str:
        where = f".{self.target}" if self.target else ""
        return f"{'' if self.layer == 'hv' else self.layer + '.'}{self.method}{where}" + \
            (f"#{self.k}" if self.k > 1 else "")


@dataclass
class Call:
    """One call seen in a run: where, and the operation's state when it was made."""

    n: int  # position in the run, from 1
    point: Point
    state: str
    # Fingerprints of what a crash would leave (World.fingerprint) just before
    # and just after the call; recorded in clean runs only, for sync calls never.
    fp_before: str = ""
    fp_after: str = ""


@dataclass(frozen=True)
class Fault:
    point: Point
    phase: str  # before | after
    action: str  # raise | kill

    def to_json(self) -> dict[str, Any]:
        return {"point": asdict(self.point), "phase": self.phase, "action": self.action}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fault:
        return cls(Point(**d["point"]), d["phase"], d["action"])


#: Reads the operation's state now; a state in harness.TERMINAL stops the counting.
StateReader = Callable[[], Awaitable[str]]
#: Digests what a crash now would leave behind (see World.fingerprint).
Probe = Callable[[], Awaitable[str]]


def _target(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The domain a call is about: its name argument, a domain XML's <name>, a backend's clone or source."""
    for key in ("clone", "ctx"):
        obj = kwargs.get(key)
        if obj is not None:
            return str(getattr(obj, "name", None) or getattr(getattr(obj, "source", None), "name", ""))
    if "domain" in kwargs:
        return str(kwargs["domain"])
    first = args[0] if args else kwargs.get("name", kwargs.get("xml"))
    if isinstance(first, str) and first.lstrip().startswith("<"):
        return ET.fromstring(first).findtext("name") or ""
    return first if isinstance(first, str) else ""


class Injector:
    """Counts calls while armed and fires at most one fault.

    ``on_kill`` runs just before a ``kill`` fault's SIGKILL (a fake
    hypervisor saves its state there: it lives in this process only).
    ``clone``: the operation's clone name, called "clone" in points.
    """

    def __init__(self, fault: Fault | None = None, on_kill: Callable[[], None] | None = None,
                 *, clone: str = "") -> None:
        self.fault = fault
        self.clone = clone
        self.on_kill = on_kill
        self.calls: list[Call] = []
        #: (call, phase) in the order the moments happened (calls nest: a
        #: backend method's hypervisor calls come between its before and after).
        self.moments: list[tuple[Call, str]] = []
        self.fired: Call | None = None
        self._state: StateReader | None = None
        self._probe: Probe | None = None
        self._last_state = "?"
        self._seen: dict[tuple[str, str, str], int] = {}

    def arm(self, state: StateReader, probe: Probe | None = None) -> None:
        self._state = state
        self._probe = probe

    def disarm(self) -> None:
        self._state = self._probe = None

    async def _refresh(self) -> bool:
        if self._state is None:
            return False
        self._last_state = await self._state()
        return self._last_state not in harness.TERMINAL

    def _count(self, layer: str, method: str, target: str) -> Call:
        if self.clone and (target == self.clone or target.startswith(self.clone + "-")):
            # Clone names differ from run to run: points name them "clone", "clone-2", ...
            target = "clone" + target[len(self.clone):]
        if target.startswith("instaclone-shadow-"):
            target = "shadow"  # named after the job, whose id differs from run to run
        key = (layer, method, target)
        self._seen[key] = self._seen.get(key, 0) + 1
        call = Call(len(self.calls) + 1, Point(layer, method, target, self._seen[key]), self._last_state)
        self.calls.append(call)
        return call

    def _fire(self, call: Call, phase: str) -> None:
        f = self.fault
        if f is None or self.fired is not None or f.point != call.point or f.phase != phase:
            return
        self.fired = call
        if f.action == "kill":
            if self.on_kill is not None:
                self.on_kill()
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault {phase} {call.point.label()} (call {call.n}, in {call.state})")

    async def around(self, layer: str, method: str, fn: Callable[..., Awaitable[Any]],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not await self._refresh():
            return await fn(*args, **kwargs)
        call = self._count(layer, method, _target(method, args, kwargs))
        probe = self._probe
        if probe is not None:
            call.fp_before = await probe()
        self.moments.append((call, "before"))
        self._fire(call, "before")
        out = await fn(*args, **kwargs)
        if probe is not None:
            call.fp_after = await probe()
        self.moments.append((call, "after"))
        self._fire(call, "after")
        return out

    def around_sync(self, layer: str, method: str, fn: Callable[..., Any],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # No await possible here: the state is the one the last async call saw.
        if self._state is None or self._last_state in harness.TERMINAL:
            return fn(*args, **kwargs)
        call = self._count(layer, method, _target(method, args, kwargs))
        self.moments.append((call, "before"))
        self._fire(call, "before")
        out = fn(*args, **kwargs)
        self.moments.append((call, "after"))
        self._fire(call, "after")
        return out

    def wrap(self, layer: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def acall(*args: Any, **kwargs: Any) -> Any:
                return await self.around(layer, name, fn, args, kwargs)
            return acall

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.around_sync(layer, name, fn, args, kwargs)
        return call


class HypervisorProxy:
    """The hypervisor's public methods, counted by an :class:`Injector`; everything else delegated."""

    def __init__(self, target: Any, injector: Injector) -> None:
        self._target = target
        self._injector = injector
        self._wrapped: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name.startswith("_") or not callable(attr):
            return attr
        if name not in self._wrapped:
            self._wrapped[name] = self._injector.wrap("hv", name, attr)
        return self._wrapped[name]


def instrument(backend: Any, layer: str, injector: Injector) -> Any:
    """Route the contract methods of ``backend`` (an instance) through ``injector``; returns it.

    Instance attributes shadow the class's methods, so ``isinstance`` and the
    backend's own ``super()`` calls are unaffected.
    """
    for name in harness.backend_methods(layer):
        setattr(backend, name, injector.wrap(layer, name, getattr(backend, name)))
    return backend


def live_faults(calls: list[Call], layers: tuple[str, ...] = LAYERS) -> list[tuple[Call, str]]:
    """Every (call, phase) to raise at, in call order.

    ``after`` a call that changed nothing a crash would leave (a lookup, a
    backend's pure function) is the same case as ``before`` it: the engine
    gets the same error at the same await, and nothing else differs.
    """
    out = []
    for c in calls:
        if c.point.layer not in layers:
            continue
        out.append((c, "before"))
        if not (c.fp_before and c.fp_before == c.fp_after):
            out.append((c, "after"))
    return out


def kill_faults(moments: list[tuple[Call, str]], layers: tuple[str, ...] = LAYERS) -> list[tuple[Call, str]]:
    """Every (call, phase) to SIGKILL at that leaves a different crash, in the order they happen.

    A crash leaves only the journal, the files and the domains: consecutive
    moments with the same fingerprint (after one call and before the next;
    before and after a call that changed nothing) are one case, and only the
    first is kept. Moments of sync calls have no fingerprint and are all kept.
    """
    out: list[tuple[Call, str]] = []
    last: str | None = None
    for c, phase in moments:
        fp = c.fp_before if phase == "before" else c.fp_after
        if fp and fp == last:
            continue
        last = fp or None
        if c.point.layer in layers:
            out.append((c, phase))
    return out
