"""Memory backend ``stash``: a third party's backend, as docs/development/backends.md builds it.

It imports nothing of instaclone but ``instaclone.plugin_api`` and is found
through its entry point (``instaclone_stash-0.1.dist-info/entry_points.txt``:
group ``instaclone.memory``, name ``stash``), like any installed plugin. It
copies the source's RAM and device state into one file per stun (as the
built-in ``saverestore`` does), and owns its parts:

* a config section ``[memory.stash]`` (:class:`StashSettings`): ``refuse``,
  source name globs it will not clone (``["*"]``: every source);
* a preflight finding ``stash_memory`` saying whether it serves the source,
  and why not;
* no XML changes: a source needs nothing of it (``prepare_xml`` is the default).

The contract suite runs it like the built-ins (tests/contract: every call
fails once, then nothing may be left).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from instaclone.plugin_api import (
    ERROR,
    OK,
    CloneTarget,
    DomainInfo,
    Finding,
    MemoryBackend,
    MemoryImage,
    Recorder,
    ResourceKind,
    StunContext,
    domxml,
    remove_path,
    setting,
)


@dataclass(frozen=True)
class StashSettings:
    """The stash memory backend (a test plugin: tests/thirdparty)."""

    refuse: tuple[str, ...] = setting((), help=(
        "Source names (globs) stash will not clone; [\"*\"] refuses every source, which the next backend of "
        "clone.memory_backends then serves."))
    file_name: str = setting("stash.state", help="The file in the job's directory that holds the source's state.")


class StashMemory(MemoryBackend):
    name = "stash"
    settings_class = StashSettings
    supports_running_source = True
    supports_frozen_source = True
    shares_memory = False

    def _refusal(self, source: str) -> str | None:
        """Why stash will not clone ``source`` (its config says so), or None."""
        for pattern in self.settings(StashSettings).refuse:
            if fnmatch.fnmatchcase(source, pattern):
                return f"memory.stash.refuse has {pattern!r}: stash does not clone {source!r}"
        return None

    def can_serve(self, source: DomainInfo) -> str | None:
        return self._refusal(source.name)

    def preflight(self, *, xml: str) -> list[Finding]:
        name = domxml.parse(xml).findtext("name") or ""
        why = self._refusal(name)
        if why is not None:
            return [Finding("stash_memory", False, ERROR, why, "(not in the XML: memory.stash.refuse in the config)")]
        return [Finding("stash_memory", True, OK, "stash copies the source's RAM: one full copy per clone")]

    async def capture(self, *, ctx: StunContext, record: Recorder) -> MemoryImage:
        path = ctx.job_dir / self.settings(StashSettings).file_name
        await record(ResourceKind.FILE, str(path))  # before it exists: a failure leaves nothing
        await self.virt.save_state(ctx.source.name, path, ignore_shared=False,
                                   timeout_s=self.config.clone.step_timeout_s)
        return MemoryImage(self.name, {"path": str(path)})

    def qemu_args(self, *, ctx: StunContext, clone: CloneTarget) -> list[str]:
        return ["-incoming", "defer"]

    async def start_clone(self, *, ctx: StunContext, clone: CloneTarget) -> None:
        await self.virt.start(clone.name, paused=True)
        await self.virt.load_state(clone.name, ctx.image.path("path"), ignore_shared=False,
                                   timeout_s=self.config.clone.step_timeout_s)

    async def release(self, *, image: MemoryImage) -> None:
        await remove_path(image.path("path"))
