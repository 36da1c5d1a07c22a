"""``instaclone``: command-line client of the control API.

Errors are one line on stderr and a non-zero exit status (1 for an error the
daemon reported, 2 for a usage error, 3 when the daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_SOCKET = "/run/instaclone/control.sock"


class CliError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


async def _request(sock: str, method: str, path: str, body: dict[str, Any] | None = None,
                   timeout_s: float = 660.0) -> dict[str, Any]:
    conn = aiohttp.UnixConnector(path=sock)
    try:
        async with (
            aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s,
            s.request(method, f"http://instaclone{path}", json=body) as resp,
        ):
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise CliError(f"daemon sent a non-JSON answer (HTTP {resp.status})") from None
                if resp.status >= 400:
                    err = (data or {}).get("error", {})
                    raise CliError(f"{err.get('message', 'HTTP ' + str(resp.status))} [{err.get('code', '?')}]")
                return dict(data)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach instacloned at {sock}: {exc.strerror or exc}", 3) from None


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def _print_job(job: dict[str, Any]) -> None:
    print(f"job {job['id']}  source={job['source']}  state={job['state']}")
    print(f"  clones: {', '.join(job['spec'].get('names', []))}")
    durations = job.get("durations_ms", {})
    t0 = job["history"][0]["at"] if job["history"] else 0
    for h in job["history"]:
        print(f"  {h['state']:<20} +{(h['at'] - t0) * 1000:8.1f} ms  (step {_fmt_ms(durations.get(h['state']))})")
    if job.get("error"):
        e = job["error"]
        print(f"  error: {e.get('message')} [{e.get('code')}]" + (f" at {e['step']}" if e.get("step") else ""))
        for left in e.get("left_behind", []):
            print(f"  left behind: {left}")
    result = job.get("result") or {}
    if result.get("memory_backend"):
        mem = result.get("memory") or {}
        extra = f", device state {mem['state_bytes'] / 1e6:.2f} MB" if mem.get("state_bytes") else ""
        mode = f" ({mem['mode']})" if mem.get("mode") else ""
        print(f"  memory backend: {result['memory_backend']}{mode}{extra}")
    if result.get("stun_ms") is not None:
        print(f"  source stunned for {result['stun_ms']:.1f} ms")
    elif result.get("frozen_source"):
        print("  frozen source: no stun")
    for c in result.get("clones", []):
        print(f"  clone {c['name']}  uuid={c['uuid']}  mac={','.join(c.get('macs', []))}  state={c.get('state')}")
        ident = c.get("identity") or {}
        if ident.get("hostname"):
            addrs = [a for i in ident.get("interfaces", []) for a in i.get("addresses", [])]
            print(f"    guest: hostname={ident['hostname']}  addresses={','.join(addrs) or '-'}")
        for item, st in (ident.get("reset") or {}).items():
            print(f"    {item:<17} {st.get('status'):<12} {st.get('detail', '')}")
        for fp in ident.get("ssh_host_key_fingerprints") or []:
            print(f"    ssh host key      {fp}")
        if ident.get("script"):
            print(f"    script            exit {ident['script']['exit_status']}")
        if c.get("nvram"):
            print(f"    nvram             {c['nvram']}")


_LEVELS = {"ok": "OK", "warn": "WARN", "error": "FAIL"}


def _print_check(report: dict[str, Any]) -> None:
    """One line per capability (OK/WARN/FAIL), then the fixes."""
    verdict = "cloneable" if report["cloneable"] else "NOT cloneable"
    extra = f", clone of {report['clone_of']}" if report.get("clone_of") else ""
    print(f"{report['source']}: {verdict} ({report['state']}{', frozen' if report.get('frozen') else ''}{extra})")
    rows = [[_LEVELS.get(c["level"], c["level"]), c["capability"] + (f" {c['device']}" if c.get("device") else ""),
             c["detail"]] for c in report["checks"]]
    width = max(len(r[1]) for r in rows)
    for level, cap, detail in rows:
        print(f"  {level:<4}  {cap:<{width}}  {detail}")
    fixes = [c for c in report["checks"] if c.get("fix")]
    if fixes:
        print("fixes (instaclone prepare makes those it can; see --dry-run):")
        for c in fixes:
            print(f"  {c['capability']}{' ' + c['device'] if c.get('device') else ''}: {c['fix']}")
    if report.get("pending"):
        print(f"pending until the next boot: {', '.join(report['pending'])}")


def _print_prepare(p: dict[str, Any]) -> None:
    if p["diff"]:
        print(p["diff"], end="" if p["diff"].endswith("\n") else "\n")
    for c in p["changed"]:
        print(f"{'would change' if p['dry_run'] else 'changed'}: {c}")
    for c in p["not_changed"]:
        print(f"not changed: {c}")
    print(p["note"])


def _clone_options(args: argparse.Namespace) -> dict[str, Any]:
    """The optional clone request fields given on the command line."""
    out: dict[str, Any] = {}
    if args.keep_ssh_host_keys:
        out["keep_ssh_host_keys"] = True
    if args.script:
        try:
            out["script"] = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--script {args.script}: {exc}", 2) from None
    return out


def _kv(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise CliError(f"--config wants KEY=VALUE, got {p!r}", 2)
        out[key] = value
    return out


def _hms(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _listing(out_json: bool, rows: list[dict[str, Any]], header: list[str],
             row: Callable[[dict[str, Any]], list[str]]) -> None:
    """A list from the API: JSON as is, or a table of ``row(item)`` under ``header``."""
    if out_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        _table([row(r) for r in rows], header)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())


async def run(args: argparse.Namespace) -> int:
    sock = args.socket
    out_json = args.output == "json"

    def emit(data: Any) -> None:
        print(json.dumps(data, indent=2, sort_keys=True))

    if args.cmd == "clone":
        wait = f"?wait={args.timeout:g}" if args.wait else ""
        data = await _request(sock, "POST", f"/v1/jobs{wait}",
                              {"source": args.source, "name": args.name, "count": args.count,
                               "keep_network": args.keep_network, "customize": not args.no_customize,
                               "config": _kv(args.config), **_clone_options(args)})
        job = data["job"]
        if out_json:
            emit(job)
        else:
            _print_job(job)
        if args.wait and job["state"] != "Unstunned":
            return 1
        return 0
    if args.cmd == "jobs":
        if args.jobs_cmd == "show":
            q = f"?wait={args.wait:g}" if args.wait else ""
            job = (await _request(sock, "GET", f"/v1/jobs/{args.job_id}{q}"))["job"]
            emit(job) if out_json else _print_job(job)
            return 0
        jobs = (await _request(sock, "GET", "/v1/jobs"))["jobs"]
        _listing(out_json, jobs, ["JOB", "SOURCE", "CLONES", "STATE", "CREATED"],
                 lambda j: [j["id"], j["source"], ",".join(j["spec"].get("names", [])), j["state"],
                            _hms(j["created_at"])])
        return 0
    if args.cmd == "clones":
        clones = (await _request(sock, "GET", "/v1/clones"))["clones"]
        _listing(out_json, clones, ["NAME", "SOURCE", "STATE", "UUID", "JOB"],
                 lambda c: [c["name"], c["source"], c["state"], c["uuid"], c["job_id"]])
        return 0
    if args.cmd == "destroy":
        data = await _request(sock, "DELETE", f"/v1/clones/{args.name}")
        emit(data) if out_json else print(f"destroyed {args.name}")
        return 0
    if args.cmd in ("freeze", "unfreeze"):
        data = await _request(sock, "POST", f"/v1/sources/{args.source}/{args.cmd}")
        entry = data["frozen" if args.cmd == "freeze" else "unfrozen"]
        if out_json:
            emit(entry)
        elif args.cmd == "freeze":
            print(f"froze {args.source} in {entry['freeze_ms']:.0f} ms (memory backend {entry['backend']}); "
                  "clones from it need no stun")
        else:
            print(f"unfroze {args.source} ({entry['clones']} clones made while frozen)")
        return 0
    if args.cmd == "check":
        report = (await _request(sock, "GET", f"/v1/sources/{args.source}/check"))["check"]
        emit(report) if out_json else _print_check(report)
        return 0 if report["cloneable"] else 1
    if args.cmd == "prepare":
        data = (await _request(sock, "POST", f"/v1/sources/{args.source}/prepare", {"dry_run": args.dry_run}))
        emit(data["prepare"]) if out_json else _print_prepare(data["prepare"])
        return 0
    if args.cmd == "frozen":
        rows = (await _request(sock, "GET", "/v1/frozen"))["frozen"]
        _listing(out_json, rows, ["SOURCE", "STATUS", "MEMORY", "CLONES", "SINCE"],
                 lambda r: [r["name"], r["status"], r["backend"], str(r["clones"]), _hms(r["since"])])
        return 0
    if args.cmd == "events":
        return await _events(sock, args, out_json)
    if args.cmd == "webhooks":
        return await _webhooks(sock, args, out_json, emit)
    if args.cmd == "status":
        data = await _request(sock, "GET", "/v1/health")
        if out_json:
            emit(data)
        else:
            for k, v in data.items():
                print(f"{k}: {v}")
        return 0
    raise CliError("no command given", 2)


def _event_line(e: dict[str, Any]) -> str:
    d = e.get("data", {})
    ts = d.get("at") or 0
    when = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"
    what = d.get("clone") or ",".join(d.get("clones", [])) or d.get("source", "")
    line = f"{when}  {e['type']:<28} {(d.get('job_id') or '-'):<16}  {what}"
    if d.get("duration_ms") is not None:
        line += f"  ({d['duration_ms']:.0f} ms)"
    if d.get("stun_ms") is not None:
        line += f"  stun {d['stun_ms']:.0f} ms"
    if d.get("error"):
        line += f"  error: {d['error'].get('message')} [{d['error'].get('code')}]"
    return line


async def _events(sock: str, args: argparse.Namespace, out_json: bool) -> int:
    """Print events; with --follow keep printing them as they happen (until interrupted)."""
    q: list[str] = [f"tail={args.tail}"]
    if args.follow:
        q.append("follow=1")
    if args.job:
        q.append(f"job={args.job}")
    if args.type:
        q.append("type=" + ",".join(args.type))
    if args.since is not None:
        q.append(f"since={args.since}")
    conn = aiohttp.UnixConnector(path=sock)
    try:
        async with (
            aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s,
            s.get(f"http://instaclone/v1/events?{'&'.join(q)}") as resp,
        ):
                if resp.status >= 400:
                    err = (await resp.json(content_type=None)).get("error", {})
                    raise CliError(f"{err.get('message')} [{err.get('code')}]")
                async for raw in resp.content:
                    if not raw.strip():
                        continue
                    if out_json:
                        print(raw.decode().strip(), flush=True)
                    else:
                        print(_event_line(json.loads(raw)), flush=True)
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(f"cannot reach instacloned at {sock}: {getattr(exc, 'strerror', None) or exc}", 3) from None
    except aiohttp.ClientPayloadError:
        raise CliError("the daemon closed the event stream (stopping?)") from None
    return 0


async def _webhooks(sock: str, args: argparse.Namespace, out_json: bool, emit: Callable[[Any], None]) -> int:
    if args.webhooks_cmd == "ls":
        rows = (await _request(sock, "GET", "/v1/webhooks"))["webhooks"]
        _listing(out_json, rows, ["NAME", "URL", "ENABLED", "EVENTS", "PENDING", "DELIVERED", "FAILED", "DISABLED"],
                 lambda w: [w["name"], w["url"], "yes" if w["enabled"] else "no (410)", ",".join(w["events"]),
                            *(str(w["deliveries"].get(k, 0)) for k in ("pending", "delivered", "failed",
                                                                       "disabled"))])
        return 0
    if args.webhooks_cmd == "enable":
        data = await _request(sock, "POST", f"/v1/webhooks/{args.name}/enable")
        emit(data) if out_json else print(f"enabled {args.name}" + (
            "" if data["was_disabled"] else " (it was not disabled)") +
            "; replay what it missed with: instaclone webhooks deliveries replay --status disabled")
        return 0
    if args.deliveries_cmd == "ls":
        q = [f"limit={args.limit}"] + [f"{k}={v}" for k, v in (("status", args.status), ("webhook", args.webhook),
                                                              ("job", args.job), ("event", args.event)) if v]
        rows = (await _request(sock, "GET", "/v1/webhooks/deliveries?" + "&".join(q)))["deliveries"]
        _listing(out_json, rows, ["ID", "WEBHOOK", "EVENT", "TYPE", "STATUS", "ATTEMPTS", "LAST", "NEXT", "ERROR"],
                 lambda d: [str(d["id"]), d["webhook"], d["event_id"], d["event_type"], d["status"],
                            str(d["attempts"]), str(d["last_status"] or "-"),
                            _hms(d["next_at"]) if d["status"] == "pending" else "-", (d["last_error"] or "")[:60]])
        return 0
    body: dict[str, Any] = {}
    if args.ids:
        body["ids"] = args.ids
    for key in ("status", "webhook"):
        if getattr(args, key):
            body[key] = getattr(args, key)
    if args.event:
        body["event_id"] = args.event
    if not body:
        raise CliError("say what to replay: delivery ids, or --status/--webhook/--event", 2)
    data = await _request(sock, "POST", "/v1/webhooks/deliveries/replay", body)
    emit(data) if out_json else print(f"queued {len(data['replayed'])} deliveries again")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instaclone", description="instant clones of running libvirt VMs")
    p.add_argument("--socket", default=os.environ.get("INSTACLONE_SOCKET", DEFAULT_SOCKET),
                   help="control socket of instacloned (env INSTACLONE_SOCKET)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clone", help="instant-clone a running or paused VM")
    c.add_argument("source")
    c.add_argument("--name", required=True, help="clone name; with --count > 1, the prefix of NAME-1..NAME-K")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--wait", action="store_true", help="wait until the job finishes")
    c.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="data handed to the guest (/run/instaclone/config.json); repeatable")
    c.add_argument("--no-customize", action="store_true",
                   help="skip the guest-side identity reset (hostname, machine-id, DHCP)")
    c.add_argument("--keep-ssh-host-keys", action="store_true", default=None,
                   help="keep the source's SSH host keys (default: every clone gets new ones)")
    c.add_argument("--script", metavar="FILE",
                   help="shell script run in each clone after its identity reset ('-': stdin)")
    c.add_argument("--keep-network", action="store_true",
                   help="do not hold the clone's link down until its NIC is replaced (isolated networks)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    j = sub.add_parser("jobs", help="list or show clone jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jsub.add_parser("ls")
    js = jsub.add_parser("show")
    js.add_argument("job_id")
    js.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for the job to end")
    cl = sub.add_parser("clones", help="list clones")
    clsub = cl.add_subparsers(dest="clones_cmd", required=True)
    clsub.add_parser("ls")
    d = sub.add_parser("destroy", help="power off and delete a clone and its files")
    d.add_argument("name")
    f = sub.add_parser("freeze", help="pause a source once as a template: clones from it need no stun")
    f.add_argument("source")
    u = sub.add_parser("unfreeze", help="let a frozen source run again (its clones are not affected)")
    u.add_argument("source")
    ck = sub.add_parser("check", help="can SRC be instant-cloned? per capability, and what to change "
                                      "(exit status 1 if not cloneable)")
    ck.add_argument("source")
    pr = sub.add_parser("prepare", help="write what instant clones need into SRC's persistent definition "
                                        "(applies at its next boot)")
    pr.add_argument("source")
    pr.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    sub.add_parser("frozen", help="list frozen sources")
    sub.add_parser("status", help="daemon status")
    ev = sub.add_parser("events", help="show events (state changes); -f follows new ones")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    ev.add_argument("--job", help="only this job's events")
    ev.add_argument("--type", action="append", default=[], metavar="TYPE",
                    help="event type or glob (clone.ready, clone.*); repeatable")
    ev.add_argument("--since", type=int, metavar="CURSOR", help="events after this cursor (see -o json)")
    ev.add_argument("--tail", type=int, default=20, help="how many past events to show first (default 20)")
    wh = sub.add_parser("webhooks", help="webhook endpoints and their deliveries")
    whsub = wh.add_subparsers(dest="webhooks_cmd", required=True)
    whsub.add_parser("ls", help="endpoints from the config, with delivery counts")
    we = whsub.add_parser("enable", help="re-enable an endpoint that answered 410 Gone")
    we.add_argument("name")
    dl = whsub.add_parser("deliveries", help="list or replay deliveries")
    dlsub = dl.add_subparsers(dest="deliveries_cmd", required=True)
    dls = dlsub.add_parser("ls", help="deliveries, newest first")
    dlr = dlsub.add_parser("replay", help="send deliveries again (same event id)")
    dlr.add_argument("ids", nargs="*", type=int, help="delivery ids")
    for sp in (dls, dlr):
        sp.add_argument("--status", choices=("pending", "delivered", "failed", "disabled"))
        sp.add_argument("--webhook", help="endpoint name")
        sp.add_argument("--event", help="event id")
    dls.add_argument("--job", help="job id")
    dls.add_argument("--limit", type=int, default=50)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"instaclone: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
