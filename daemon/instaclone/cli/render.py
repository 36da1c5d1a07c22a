"""How ``instaclone`` shows the control API's answers as text: jobs, checks, lists, events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .output import Column, Listing, hms, table, when


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def print_job(job: dict[str, Any], history: bool = True) -> None:
    """A job: its states with their times (unless ``history`` is False: the progress display showed
    them), its error and what it made."""
    print(f"job {job['id']}  source={job['source']}  state={job['state']}")
    print(f"  clones: {', '.join(job['spec'].get('names', []))}")
    durations = job.get("durations_ms", {})
    t0 = job["history"][0]["at"] if job["history"] else 0
    for h in job["history"] if history else []:
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
        stun = result.get("stun") or {}
        shared = len(stun.get("jobs", [])) - 1
        also = f" (one stun shared with {shared} other job{'s' if shared > 1 else ''})" if shared > 0 else ""
        print(f"  source stunned for {result['stun_ms']:.1f} ms{also}")
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
    failed = result.get("failed_clones") or (job.get("error") or {}).get("failed_clones") or []
    for f in failed:
        err = f.get("error") or {}
        print(f"  clone {f['name']}  FAILED and removed: {err.get('message')} [{err.get('code')}]")
        for left in f.get("left_behind") or []:
            print(f"    left behind: {left}")


_LEVELS = {"ok": "OK", "warn": "WARN", "error": "FAIL"}


def print_check(report: dict[str, Any]) -> None:
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


def print_prepare(p: dict[str, Any]) -> None:
    if p["diff"]:
        print(p["diff"], end="" if p["diff"].endswith("\n") else "\n")
    for c in p["changed"]:
        print(f"{'would change' if p['dry_run'] else 'changed'}: {c}")
    for c in p["not_changed"]:
        print(f"not changed: {c}")
    print(p["note"])


def _stun(j: dict[str, Any]) -> str:
    ms = (j.get("result") or {}).get("stun_ms")
    return "-" if ms is None else f"{ms:.0f}ms"


def _elapsed(j: dict[str, Any]) -> str:
    hist = j.get("history") or []
    return f"{(hist[-1]['at'] - hist[0]['at']) * 1000:.0f}ms" if len(hist) > 1 else "-"


def _error(d: dict[str, Any]) -> str:
    e = d.get("error") or d.get("last_error") or {}
    return str(e.get("code") or "") if isinstance(e, dict) else str(e)[:60]


def _count(status: str) -> Callable[[dict[str, Any]], str]:
    return lambda w: str(w["deliveries"].get(status, 0))


#: Every list the CLI prints: its columns (``wide``: only with ``-o wide``) and the field ``-q`` prints.
JOBS = Listing((
    Column("JOB", lambda j: j["id"]),
    Column("SOURCE", lambda j: j["source"]),
    Column("CLONES", lambda j: ",".join(j["spec"].get("names", []))),
    Column("STATE", lambda j: j["state"]),
    Column("CREATED", lambda j: hms(j["created_at"])),
    Column("TOOK", _elapsed, wide=True),
    Column("STUN", _stun, wide=True),
    Column("ERROR", _error, wide=True),
), key="id")
CLONES = Listing((
    Column("NAME", lambda c: c["name"]),
    Column("SOURCE", lambda c: c["source"]),
    Column("STATE", lambda c: c["state"]),
    Column("UUID", lambda c: c["uuid"]),
    Column("JOB", lambda c: c["job_id"]),
    Column("POOL", lambda c: c.get("pool") or "-", wide=True),
    Column("CREATED", lambda c: when(c.get("created_at")), wide=True),
    Column("EXPIRES", lambda c: when(c.get("expires_at")), wide=True),
    Column("DIR", lambda c: c.get("dir") or "-", wide=True),
), key="name")
FROZEN = Listing((
    Column("SOURCE", lambda r: r["name"]),
    Column("STATUS", lambda r: r["status"]),
    Column("MEMORY", lambda r: r["backend"]),
    Column("CLONES", lambda r: str(r["clones"])),
    Column("SINCE", lambda r: hms(r["since"])),
    Column("PAUSED BY US", lambda r: "yes" if r.get("paused_by_us") else "no", wide=True),
    Column("IMAGE", lambda r: ",".join(f"{k}={v}" for k, v in sorted((r.get("image") or {}).items())) or "-",
           wide=True),
), key="name")
WEBHOOKS = Listing((
    Column("NAME", lambda w: w["name"]),
    Column("URL", lambda w: w["url"]),
    Column("ENABLED", lambda w: "yes" if w["enabled"] else "no (410)"),
    Column("EVENTS", lambda w: ",".join(w["events"])),
    *(Column(k.upper(), _count(k)) for k in ("pending", "delivered", "failed", "disabled")),
), key="name")
DELIVERIES = Listing((
    Column("ID", lambda d: str(d["id"])),
    Column("WEBHOOK", lambda d: d["webhook"]),
    Column("EVENT", lambda d: d["event_id"]),
    Column("TYPE", lambda d: d["event_type"]),
    Column("STATUS", lambda d: d["status"]),
    Column("ATTEMPTS", lambda d: str(d["attempts"])),
    Column("LAST", lambda d: str(d["last_status"] or "-")),
    Column("NEXT", lambda d: hms(d["next_at"]) if d["status"] == "pending" else "-"),
    Column("ERROR", lambda d: (d["last_error"] or "")[:60]),
    Column("JOB", lambda d: d.get("job_id") or "-", wide=True),
    Column("UPDATED", lambda d: when(d.get("updated_at")), wide=True),
), key="id")


def event_line(e: dict[str, Any]) -> str:
    d = e.get("data", {})
    ts = d.get("at") or 0
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"
    what = d.get("clone") or ",".join(d.get("clones", [])) or d.get("source", "")
    line = f"{stamp}  {e['type']:<28} {(d.get('job_id') or '-'):<16}  {what}"
    if d.get("duration_ms") is not None:
        line += f"  ({d['duration_ms']:.0f} ms)"
    if d.get("stun_ms") is not None:
        line += f"  stun {d['stun_ms']:.0f} ms"
    if d.get("error"):
        line += f"  error: {d['error'].get('message')} [{d['error'].get('code')}]"
    return line


def size(n: int) -> str:
    """Bytes for people: 0 B, 196 KiB, 1.4 MiB, 2.0 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_gc(report: dict[str, Any]) -> None:
    """What ``instaclone gc`` deleted (or, dry run, would delete)."""
    verb = "would delete" if report["dry_run"] else "deleted"
    for item in report["deleted"]:
        print(f"{verb} {item['path']} ({size(item['bytes'])})")
    print(f"{verb} {len(report['deleted'])} files, {size(report['bytes'])}")
    for name in report.get("released", []):
        print(f"{'would free' if report['dry_run'] else 'freed'} the name and directory of destroyed clone {name}")
    for r in report.get("retained", []):
        print(f"kept {r['dir']} ({size(r['bytes'])}) of destroyed clone {r['clone']}: its clones' disks use it")
    for f in report.get("failed", []):
        print(f"could not remove {f}")
    for k in report.get("kept", []):
        print(f"left {k['path']}: {k['reason']} (not the file instaclone made, or holds files it did not make)")


def print_disk(disk: dict[str, Any]) -> None:
    """Disk use under instaclone's directories, per source (part of ``instaclone status``)."""
    rows = [[s["source"], str(s["clones"]), size(s["deltas_bytes"]), size(s["clones_bytes"]),
             size(s["retained_bytes"]), size(s["frozen_bytes"]), size(s["bytes"])] for s in disk["sources"]]
    table(rows, ["SOURCE", "CLONES", "DELTAS", "CLONE FILES", "RETAINED", "FROZEN", "TOTAL"])
    print(f"total: {size(disk['total_bytes'])} ({size(disk['other_bytes'])} in no source's files)")
