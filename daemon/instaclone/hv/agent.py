"""The QEMU guest agent, through libvirt."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..errors import LibvirtError, LibvirtTimeout
from . import _libvirt as lv, guestfiles
from .connection import Connection


class Agent(Connection):
    """Guest agent commands and guest-exec."""

    async def agent(self, name: str, command: str, arguments: dict[str, Any] | None = None,
                    *, timeout_s: int = 10) -> Any:
        """Run one QEMU guest agent command through libvirt; returns its "return" value.

        LibvirtError if the agent answers with an error; LibvirtTimeout if it does not answer.
        """

        def do() -> Any:
            cmd: dict[str, Any] = {"execute": command}
            if arguments is not None:
                cmd["arguments"] = arguments
            reply = json.loads(lv.qemu_agent_command(self._dom(name), json.dumps(cmd), timeout_s))
            if "error" in reply:
                raise LibvirtError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

        # On the agent's own threads: a guest that does not answer never delays a stun's libvirt calls.
        return await self._call(f"guest agent {command} in {name!r}", do, agent=True)

    async def agent_exec(self, name: str, argv: list[str], *, stdin: bytes = b"",
                         timeout_s: float = 30.0) -> tuple[int, str]:
        """Run ``argv`` in the guest (guest-exec); returns (exit status, stdout+stderr).

        LibvirtTimeout if it has not finished after ``timeout_s``.
        """
        pid = await guestfiles.exec_start(self, name, argv, input_data=stdin or None, capture=True)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        delay = 0.02
        while True:
            st = await guestfiles.exec_status(self, name, pid)
            if st is not None:
                code = st["exitcode"]
                return int(code if code is not None else -1), (st["out"] + st["err"]).decode(errors="replace")
            if loop.time() > end:
                raise LibvirtTimeout(f"{argv[0]} in {name!r} did not finish within {timeout_s:g} s")
            await asyncio.sleep(delay)
            # One status call is ~1 ms; a coarser poll adds up to its step to
            # every command (a clone's start waits on three of them).
            delay = min(delay * 2, 0.05)
