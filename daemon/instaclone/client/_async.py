"""The asyncio client of instacloned's control API (``instaclone.client.Client``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar
from urllib.parse import quote

import aiohttp

from ._transport import DEFAULT_TIMEOUT_S, WAIT_MARGIN_S, Params, Transport, decode, resolve_socket
from .errors import (
    ApiError,
    BodyTooLarge,
    ChecksumMismatch,
    ClientError,
    DaemonUnreachable,
    GuestFileError,
    NotFound,
    ProtocolError,
    from_error_dict,
)
from .models import (
    TERMINAL_STATES,
    Claim,
    Clone,
    Event,
    ExecExit,
    ExecOutput,
    ExecResult,
    FileInfo,
    Health,
    Job,
    Pool,
)

T = TypeVar("T")

#: The longest wait the API accepts in one request (``?wait=``); longer waits take several.
MAX_WAIT_S = 600.0
#: How much of a file one chunk of an upload or download holds.
CHUNK_BYTES = 1 << 20
#: Reconnections of a followed event stream after the daemon went away, before giving up.
FOLLOW_RETRIES = 8  # with the backoff below: about 20 s, a daemon restart with its recovery
SHA256_HEADER = "X-Instaclone-SHA256"
#: The largest file the API takes (``PUT /v1/clones/{name}/files``): refused here before sending it.
MAX_FILE_BYTES = 4 << 30


def _build(make: Callable[[object], T], d: object) -> T:
    """A model from answer data; a malformed answer is a ProtocolError, never a TypeError."""
    try:
        return make(d)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"the daemon's answer is malformed: {exc}: {d!r:.200}") from None


def _field(data: object, key: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ProtocolError(f"the daemon's answer has no {key!r}: {data!r:.200}")
    return data[key]


def _seg(name: str) -> str:
    """``name`` as one URL path segment (a name with '/' must not reach another route)."""
    return quote(str(name), safe="")


def _name_of(clone: str | Clone | Claim) -> str:
    return clone if isinstance(clone, str) else clone.name


def _mode(mode: int | str | None) -> str | None:
    if mode is None:
        return None
    return f"{mode:04o}" if isinstance(mode, int) else mode


async def _ndjson(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an NDJSON body, one per line, as they arrive (lines of any length)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield _line(line)
    if buf.strip():
        yield _line(buf)


def _line(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the daemon sent a line that is not a JSON object: {line[:200]!r}")
    return obj


def _b64(item: Mapping[str, Any]) -> bytes:
    try:
        return base64.b64decode(str(item.get("data", "")), validate=True)
    except ValueError:
        raise ProtocolError(f"exec output is not base64: {str(item.get('data'))[:100]!r}") from None


class ClaimHandle:
    """What :meth:`Client.claim` returns: awaitable (the Claim, kept until released) and an async context manager.

    ``async with c.claim("ci") as vm:`` releases the clone on exit, also when
    the body raises or is cancelled. A release that fails on exit is raised,
    unless the body raised (then it is added to that exception as a note); a
    clone already gone (released in the body, expired) counts as released.
    """

    def __init__(self, client: Client, pool: str, body: dict[str, Any], timeout_s: float) -> None:
        self._client, self._pool, self._body, self._timeout_s = client, pool, body, timeout_s
        self.claim: Claim | None = None

    async def _take(self) -> Claim:
        data = await self._client._t.json("POST", f"/v1/pools/{_seg(self._pool)}/claim", body=self._body,
                                          timeout_s=self._timeout_s)
        self.claim = _build(Claim.from_dict, _field(data, "claim"))
        return self.claim

    def __await__(self) -> Generator[Any, None, Claim]:
        return self._take().__await__()

    async def __aenter__(self) -> Claim:
        return await self._take()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.claim is None:
            return
        try:
            await self._client.release(self.claim.name)
        except NotFound:
            pass  # already gone: released in the body, or its TTL ran out
        except ClientError as err:
            if exc is None:
                raise
            exc.add_note(f"and releasing the claimed clone {self.claim.name!r} failed: {err}")


class Client:
    """An asyncio client of instacloned.

    ``async with Client() as c: job = await c.clone("tmpl", name="ci", wait=True)``.

    ``socket``: the control socket (else ``$INSTACLONE_SOCKET``, else
    /run/instaclone/control.sock). ``timeout_s``: the deadline of a plain
    request (waits get their own; streams have none). Every method raises
    the :mod:`~instaclone.client.errors` class of the daemon's error code
    (an :class:`ApiError`), :class:`DaemonUnreachable` /
    :class:`PermissionDenied` when the socket cannot be used, and
    :class:`ProtocolError` for an answer that is not the API's.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket = resolve_socket(socket)
        self._t = Transport(self.socket, timeout_s=timeout_s)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (a later call opens a new one)."""
        await self._t.close()

    # -- daemon ---------------------------------------------------------------------------

    async def health(self) -> Health:
        return _build(Health.from_dict, await self._t.json("GET", "/v1/health"))

    async def request(self, method: str, path: str, *, body: object = None,
                      params: Mapping[str, str | int | float] | None = None, timeout_s: float | None = None) -> Any:
        """Any API call (``path`` under ``/v1``) for which this client has no method yet; its JSON answer.

        Raises as the other methods do (typed ApiError, DaemonUnreachable, ProtocolError).
        """
        return await self._t.json(method, path, body=body, params=params, timeout_s=timeout_s)

    async def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI document."""
        return dict(await self._t.json("GET", "/v1/openapi.json"))

    # -- jobs ------------------------------------------------------------------------------

    async def clone(self, source: str, *, name: str, count: int = 1, wait: bool = False, timeout_s: float = 300.0,
                    config: Mapping[str, str] | None = None, customize: bool = True, keep_network: bool = False,
                    keep_ssh_host_keys: bool | None = None, script: str | None = None,
                    ttl_s: float | None = None) -> Job:
        """Start a clone job (``count`` clones named ``name`` or ``name-1..name-K``); the job as submitted.

        ``wait``: return when the job ended or after ``timeout_s`` (the job
        may then still run; see ``job.terminal``). A job that fails is
        returned, not raised: ``job.raise_for_state()`` raises its error.
        """
        body: dict[str, Any] = {"source": source, "name": name, "count": count, "customize": customize,
                                "keep_network": keep_network}
        for key, value in (("config", dict(config) if config is not None else None),
                           ("keep_ssh_host_keys", keep_ssh_host_keys), ("script", script), ("ttl_s", ttl_s)):
            if value is not None:
                body[key] = value
        first = min(timeout_s, MAX_WAIT_S) if wait else 0.0
        params: Params = {"wait": f"{first:g}"} if first > 0 else {}
        data = await self._t.json("POST", "/v1/jobs", body=body, params=params,
                                  timeout_s=first + WAIT_MARGIN_S if first else None)
        job = _build(Job.from_dict, _field(data, "job"))
        if wait and not job.terminal and timeout_s > first:
            job = await self.job(job.id, wait_s=timeout_s - first)
        return job

    async def job(self, job_id: str, *, wait_s: float = 0) -> Job:
        """The job ``job_id``; with ``wait_s``, once it ended or after ``wait_s`` seconds. Raises NotFound."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        while True:
            wait = min(max(end - loop.time(), 0.0), MAX_WAIT_S)
            params: Params = {"wait": f"{wait:g}"} if wait > 0 else {}
            data = await self._t.json("GET", f"/v1/jobs/{_seg(job_id)}", params=params,
                                      timeout_s=wait + WAIT_MARGIN_S if wait else None)
            job = _build(Job.from_dict, _field(data, "job"))
            if job.terminal or loop.time() >= end - 0.001:
                return job

    async def jobs(self) -> list[Job]:
        return [_build(Job.from_dict, j) for j in _field(await self._t.json("GET", "/v1/jobs"), "jobs")]

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The state events (``clone.*`` with a ``state``) of job ``job_id`` as they happen, past ones first.

        Ends after the event of its terminal state. Raises NotFound for an
        unknown job; follows the stream across a daemon restart like
        :meth:`events`.
        """
        await self.job(job_id)  # an unknown job: NotFound now, not a stream that never ends
        async for ev in self.events(job=job_id, follow=True, tail=10_000):
            if ev.state is None or ev.job_id != job_id:
                continue
            yield ev
            if ev.state in TERMINAL_STATES:
                return

    # -- clones and sources ----------------------------------------------------------------

    async def clones(self) -> list[Clone]:
        return [_build(Clone.from_dict, c) for c in _field(await self._t.json("GET", "/v1/clones"), "clones")]

    async def destroy(self, clone: str | Clone | Claim) -> Clone:
        """Power off and delete a clone instaclone made; the record of what was destroyed. Raises NotFound."""
        data = await self._t.json("DELETE", f"/v1/clones/{_seg(_name_of(clone))}")
        return _build(Clone.from_dict, _field(data, "destroyed"))

    async def freeze(self, source: str) -> dict[str, Any]:
        """Pause ``source`` once as a template (``{"name", "freeze_ms", "backend", ...}``)."""
        return dict(_field(await self._t.json("POST", f"/v1/sources/{_seg(source)}/freeze"), "frozen"))

    async def unfreeze(self, source: str) -> dict[str, Any]:
        return dict(_field(await self._t.json("POST", f"/v1/sources/{_seg(source)}/unfreeze"), "unfrozen"))

    async def frozen(self) -> list[dict[str, Any]]:
        return list(_field(await self._t.json("GET", "/v1/frozen"), "frozen"))

    async def check(self, source: str) -> dict[str, Any]:
        """The preflight report of ``source`` (``cloneable``, per capability ``ok`` and the fix)."""
        return dict(_field(await self._t.json("GET", f"/v1/sources/{_seg(source)}/check"), "check"))

    async def prepare(self, source: str, *, dry_run: bool = False) -> dict[str, Any]:
        data = await self._t.json("POST", f"/v1/sources/{_seg(source)}/prepare", body={"dry_run": dry_run})
        return dict(_field(data, "prepare"))

    async def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Delete (``dry_run``: list) the images nothing uses; the report (``deleted``, ``bytes``, ``failed``)."""
        return dict(_field(await self._t.json("POST", "/v1/gc", body={"dry_run": dry_run}), "gc"))

    # -- events ----------------------------------------------------------------------------

    async def events(self, *, since: int | None = None, follow: bool = False, job: str | None = None,
                     types: Sequence[str] | None = None, tail: int | None = None,
                     retries: int = FOLLOW_RETRIES) -> AsyncIterator[Event]:
        """Events, oldest first: after cursor ``since``, else the last ``tail`` (daemon default 100).

        Resume: pass the last event's ``cursor`` as ``since``. ``follow``: keep
        yielding new events as they are committed; if the daemon goes away
        (or restarts) the stream reconnects from the last cursor seen, up to
        ``retries`` times in a row, then raises DaemonUnreachable. Filters:
        ``job`` id, ``types`` (event types or globs such as ``clone.*``).
        """
        if isinstance(types, str):
            types = [types]  # one type given bare, not its characters
        cursor = since
        failures = 0
        while True:
            params: dict[str, str | int | float] = {}
            if cursor is not None:
                params["since"] = cursor
            elif tail is not None:
                params["tail"] = tail
            if follow:
                params["follow"] = 1
            if job:
                params["job"] = job
            if types:
                params["type"] = ",".join(types)
            try:
                async with self._t.stream("GET", "/v1/events", params=params) as resp:
                    async for item in _ndjson(resp):
                        ev = _build(Event.from_dict, item)
                        failures = 0
                        cursor = ev.cursor
                        yield ev
                if not follow:
                    return
                why: ClientError = DaemonUnreachable("the daemon closed the event stream (stopping?)",
                                                     socket=self.socket)
            except DaemonUnreachable as exc:
                if not follow:
                    raise
                why = exc
            failures += 1
            if failures > retries:
                raise why
            await asyncio.sleep(min(0.2 * 2 ** (failures - 1), 5.0))

    # -- pools -----------------------------------------------------------------------------

    async def pools(self) -> list[Pool]:
        return [_build(Pool.from_dict, p) for p in _field(await self._t.json("GET", "/v1/pools"), "pools")]

    async def pool(self, name: str) -> Pool:
        return _build(Pool.from_dict, _field(await self._t.json("GET", f"/v1/pools/{_seg(name)}"), "pool"))

    async def create_pool(self, name: str, *, source: str, size: int, config: Mapping[str, str] | None = None,
                          customize: bool = True, keep_network: bool = False, freeze: bool = False) -> Pool:
        """Create a pool keeping ``size`` ready clones of ``source`` (``freeze``: freeze the source first)."""
        body: dict[str, Any] = {"name": name, "source": source, "size": size, "customize": customize,
                                "keep_network": keep_network, "freeze": freeze}
        if config is not None:
            body["config"] = dict(config)
        return _build(Pool.from_dict, _field(await self._t.json("POST", "/v1/pools", body=body), "pool"))

    async def update_pool(self, name: str, *, source: str | None = None, size: int | None = None) -> Pool:
        """Move the pool to a new ``source`` (idle members are replaced) and/or resize it."""
        body: dict[str, Any] = {k: v for k, v in (("source", source), ("size", size)) if v is not None}
        return _build(Pool.from_dict, _field(await self._t.json("PATCH", f"/v1/pools/{_seg(name)}", body=body),
                                             "pool"))

    async def resize_pool(self, name: str, size: int) -> Pool:
        return await self.update_pool(name, size=size)

    async def delete_pool(self, name: str) -> dict[str, Any]:
        """Delete a pool and destroy its idle members (``{"pool", "destroyed", "not_destroyed"}``)."""
        return dict(_field(await self._t.json("DELETE", f"/v1/pools/{_seg(name)}"), "deleted"))

    def claim(self, pool: str, *, ttl_s: float | None = None, config: Mapping[str, str] | None = None,
              wait_s: float | None = None) -> ClaimHandle:
        """Claim an idle clone of ``pool``: ``await`` it for a Claim, or ``async with`` it to release on exit.

        ``wait_s``: how long to wait for a member to become ready (daemon
        default ``pools.claim_wait_s``); ``ttl_s``: the daemon destroys the
        clone after it; ``config``: written into the clone. Raises PoolEmpty,
        NotFound.
        """
        body: dict[str, Any] = {k: v for k, v in (("ttl_s", ttl_s), ("wait_s", wait_s)) if v is not None}
        if config is not None:
            body["config"] = dict(config)
        timeout = (wait_s + WAIT_MARGIN_S) if wait_s is not None else self._t.timeout_s
        return ClaimHandle(self, pool, body, timeout)

    async def release(self, clone: str | Clone | Claim) -> dict[str, Any]:
        """Give a claimed clone back: the daemon destroys it (``{"pool", "clone", "destroyed"}``)."""
        return dict(_field(await self._t.json("POST", f"/v1/clones/{_seg(_name_of(clone))}/release"), "released"))

    # -- webhooks --------------------------------------------------------------------------

    async def webhooks(self) -> list[dict[str, Any]]:
        return list(_field(await self._t.json("GET", "/v1/webhooks"), "webhooks"))

    async def enable_webhook(self, name: str) -> dict[str, Any]:
        """Re-enable an endpoint that answered 410 Gone (``{"webhook", "enabled", "was_disabled"}``)."""
        return dict(await self._t.json("POST", f"/v1/webhooks/{_seg(name)}/enable"))

    async def deliveries(self, *, status: str | None = None, webhook: str | None = None, job: str | None = None,
                         event: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Webhook deliveries, newest first, filtered."""
        params: dict[str, str | int | float] = {"limit": limit}
        params.update({k: v for k, v in (("status", status), ("webhook", webhook), ("job", job),
                                         ("event", event)) if v})
        return list(_field(await self._t.json("GET", "/v1/webhooks/deliveries", params=params), "deliveries"))

    async def replay(self, ids: Sequence[int] | None = None, *, status: str | None = None,
                     webhook: str | None = None, event_id: str | None = None) -> list[int]:
        """Queue deliveries again (by ``ids`` or by filter); the ids queued."""
        body: dict[str, Any] = {k: v for k, v in (("status", status), ("webhook", webhook),
                                                  ("event_id", event_id)) if v}
        if ids is not None:
            body["ids"] = list(ids)
        return list(_field(await self._t.json("POST", "/v1/webhooks/deliveries/replay", body=body), "replayed"))

    # -- commands and files inside clones --------------------------------------------------

    async def exec_stream(self, clone: str | Clone | Claim, argv: Sequence[str], *,
                          env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                          stdin: bytes | None = None) -> AsyncIterator[ExecOutput | ExecExit]:
        """Run ``argv`` in the clone (through its guest agent): its output chunks as they come, then its ExecExit.

        Raises AgentUnavailable, DomainStateInvalid, NotFound before the
        command starts; ExecTimeout (the command was killed after
        ``timeout_s``) or the stream's other error after.
        """
        body: dict[str, Any] = {"argv": list(argv)}
        if env is not None:
            body["env"] = dict(env)
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        if stdin is not None:
            body["stdin"] = base64.b64encode(stdin).decode()
        pid: int | None = None
        async with self._t.stream("POST", f"/v1/clones/{_seg(_name_of(clone))}/exec", body=body) as resp:
            async for item in _ndjson(resp):
                kind = item.get("type")
                if kind == "started":
                    pid = item.get("pid") if isinstance(item.get("pid"), int) else None
                elif kind in ("stdout", "stderr"):
                    yield ExecOutput(str(kind), _b64(item))
                elif kind == "exit":
                    code, sig, ms = item.get("exit_code"), item.get("signal"), item.get("duration_ms")
                    if not isinstance(code, int):
                        raise ProtocolError(f"exec exit without an exit_code: {item!r:.200}")
                    yield ExecExit(code, sig if isinstance(sig, int) else None,
                                   float(ms) if isinstance(ms, int | float) else 0.0, pid)
                    return
                elif kind == "error":
                    err = item.get("error")
                    raise from_error_dict(err if isinstance(err, dict) else {"code": "internal_error"},
                                          status=resp.status)
        raise ProtocolError("the exec stream ended before the command's exit")

    async def exec(self, clone: str | Clone | Claim, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   timeout_s: float | None = None, stdin: bytes | None = None) -> ExecResult:
        """Run ``argv`` in the clone and return its exit status and all its output (raises as exec_stream).

        A non-zero exit is a result, not an error (``result.ok``). On
        ExecTimeout the output so far is in the error's
        ``details["stdout"]`` / ``details["stderr"]``.
        """
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        try:
            async for item in self.exec_stream(clone, argv, env=env, timeout_s=timeout_s, stdin=stdin):
                if isinstance(item, ExecOutput):
                    out.setdefault(item.stream, []).append(item.data)
                else:
                    return ExecResult(item.exit_code, b"".join(out["stdout"]), b"".join(out["stderr"]),
                                      item.duration_ms, item.signal, item.pid)
        except ApiError as exc:
            exc.details.setdefault("stdout", b"".join(out["stdout"]))
            exc.details.setdefault("stderr", b"".join(out["stderr"]))
            raise
        raise ProtocolError("the exec stream ended before the command's exit")  # pragma: no cover

    async def put_file(self, clone: str | Clone | Claim, src: str | os.PathLike[str] | bytes, dest_path: str, *,
                       mode: int | str | None = None, progress: Callable[[int], None] | None = None) -> FileInfo:
        """Copy ``src`` (a local file, streamed in chunks, or bytes) to ``dest_path`` in the clone.

        The SHA-256 goes along (the daemon checks the body against it, the
        guest's copy against both) and the answer's size and SHA-256 are
        checked here. ``mode``: e.g. ``0o755`` or ``"0755"``. Raises BodyTooLarge (over 4 GiB),
        GuestFileNotFound (no such directory), GuestFileError,
        ChecksumMismatch, AgentUnavailable, InvalidRequest (path not
        absolute); OSError if ``src`` cannot be read. ``progress(n)``: called as each chunk of
        ``n`` bytes has gone to the daemon (for a progress display).
        """
        if isinstance(src, bytes | bytearray | memoryview):
            payload: Any = bytes(src)
            _check_size(len(payload))
            digest, size = hashlib.sha256(payload).hexdigest(), len(payload)
            if progress is not None:
                payload = _counted(_byte_chunks(payload), progress)
        else:
            path = Path(src)
            _check_size((await asyncio.to_thread(path.stat)).st_size)  # before reading it to hash it
            digest, size = await asyncio.to_thread(_hash_file, path)
            payload = _read_chunks(path) if progress is None else _counted(_read_chunks(path), progress)
        params: dict[str, str | int | float] = {"path": dest_path}
        if (m := _mode(mode)) is not None:
            params["mode"] = m
        # The length up front (not chunked): the daemon can refuse an oversized file before reading it.
        headers = {SHA256_HEADER: digest, "Content-Type": "application/octet-stream", "Content-Length": str(size)}
        async with self._t.stream("PUT", f"/v1/clones/{_seg(_name_of(clone))}/files", params=params,
                                  data=payload, headers=headers) as resp:
            data = await decode(resp)
        info = _build(FileInfo.from_dict, _field(data, "file"))
        if info.size != size or info.sha256 != digest:
            raise ChecksumMismatch(f"the guest's copy of {dest_path} is {info.size} bytes, sha256 {info.sha256}; "
                                   f"sent {size} bytes, sha256 {digest}")
        return info

    async def get_file(self, clone: str | Clone | Claim, path: str,
                       dest: str | os.PathLike[str] | IO[bytes]) -> FileInfo:
        """Copy ``path`` from the clone into ``dest`` (a local path, or a binary writer), streamed.

        The size and SHA-256 the guest announced are checked against what
        arrived; on a mismatch (or any error) a ``dest`` path is left as it
        was (the data goes to a temporary file renamed onto it at the end)
        and ChecksumMismatch is raised. A writer has then received the bytes
        that came. Raises GuestFileNotFound, GuestFileError (also for a download cut short),
        AgentUnavailable.
        """
        async with self._t.stream("GET", f"/v1/clones/{_seg(_name_of(clone))}/files",
                                  params={"path": path}) as resp:
            want_sha = resp.headers.get(SHA256_HEADER, "").lower()
            want_size = resp.content_length
            if not want_sha or want_size is None:
                raise ProtocolError(f"the file answer lacks Content-Length or {SHA256_HEADER}")
            if isinstance(dest, str | os.PathLike):
                got_sha, got_size = await _download_to_path(resp, Path(dest), want_sha, want_size, path)
            else:
                got_sha, got_size = await _download(resp, dest)
        _verify(path, want_sha, want_size, got_sha, got_size)
        return FileInfo(path=path, size=got_size, sha256=got_sha, raw=dict(resp.headers))


def _verify(path: str, want_sha: str, want_size: int, got_sha: str, got_size: int) -> None:
    if got_size != want_size or got_sha != want_sha:
        raise ChecksumMismatch(f"{path}: received {got_size} bytes, sha256 {got_sha}; the guest announced "
                               f"{want_size} bytes, sha256 {want_sha}")


async def _download(resp: aiohttp.ClientResponse, out: IO[bytes]) -> tuple[str, int]:
    """Copy the body into ``out`` (writes off the loop); (sha256 hex, bytes).

    Raises GuestFileError when the body is cut short: the daemon closes the
    connection when reading in the guest fails after the answer started.
    """
    h = hashlib.sha256()
    size = 0
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
            await asyncio.to_thread(out.write, chunk)
    except aiohttp.ClientPayloadError:
        raise GuestFileError(f"the download was cut short after {size} of {resp.content_length} bytes (reading "
                             "in the guest failed, or the daemon stopped; see its log)", code="guest_file_error",
                             status=resp.status) from None
    return h.hexdigest(), size


async def _download_to_path(resp: aiohttp.ClientResponse, dest: Path, want_sha: str, want_size: int,
                            path: str) -> tuple[str, int]:
    """Download into a temporary file next to ``dest``, renamed onto it only if size and sha256 match."""
    fd, tmp = await asyncio.to_thread(tempfile.mkstemp, prefix=f".{dest.name}.", suffix=".part",
                                      dir=dest.parent if str(dest.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as out:
            got_sha, got_size = await _download(resp, out)
        _verify(path, want_sha, want_size, got_sha, got_size)
        await asyncio.to_thread(os.replace, tmp, dest)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return got_sha, got_size


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise BodyTooLarge(f"{size} bytes is more than the {MAX_FILE_BYTES} a file copied into a clone may have",
                           code="body_too_large")


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


async def _byte_chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), CHUNK_BYTES):
        yield data[i:i + CHUNK_BYTES]


async def _counted(chunks: AsyncIterator[bytes], progress: Callable[[int], None]) -> AsyncIterator[bytes]:
    """``chunks``, telling ``progress`` each one's size once the transport has taken it (asked for
    the next)."""
    async for chunk in chunks:
        yield chunk
        progress(len(chunk))


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    """``path``'s bytes in chunks, read off the event loop."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)
