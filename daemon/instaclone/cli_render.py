"""How ``instaclone`` shows the control API's answers as text: jobs, checks, tables, events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

#: How an API item (a job, a clone, ...) becomes a table row.
Row = Callable[[dict[str, Any]], list[str]]

def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def print_job(job: dict[str, Any]) -> None:
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


def hms(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def listing(out_json: bool, rows: list[dict[str, Any]], header: list[str], row: Row) -> None:
    """A list from the API: JSON as is, or a table of ``row(item)`` under ``header``."""
    if out_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        table([row(r) for r in rows], header)


#: For each listing: its header and how an API item becomes a row.
JOBS: tuple[list[str], Row] = (
    ["JOB", "SOURCE", "CLONES", "STATE", "CREATED"],
    lambda j: [j["id"], j["source"], ",".join(j["spec"].get("names", [])), j["state"], hms(j["created_at"])])
CLONES: tuple[list[str], Row] = (
    ["NAME", "SOURCE", "STATE", "UUID", "JOB"],
    lambda c: [c["name"], c["source"], c["state"], c["uuid"], c["job_id"]])
FROZEN: tuple[list[str], Row] = (
    ["SOURCE", "STATUS", "MEMORY", "CLONES", "SINCE"],
    lambda r: [r["name"], r["status"], r["backend"], str(r["clones"]), hms(r["since"])])
WEBHOOKS: tuple[list[str], Row] = (
    ["NAME", "URL", "ENABLED", "EVENTS", "PENDING", "DELIVERED", "FAILED", "DISABLED"],
    lambda w: [w["name"], w["url"], "yes" if w["enabled"] else "no (410)", ",".join(w["events"]),
               *(str(w["deliveries"].get(k, 0)) for k in ("pending", "delivered", "failed", "disabled"))])
DELIVERIES: tuple[list[str], Row] = (
    ["ID", "WEBHOOK", "EVENT", "TYPE", "STATUS", "ATTEMPTS", "LAST", "NEXT", "ERROR"],
    lambda d: [str(d["id"]), d["webhook"], d["event_id"], d["event_type"], d["status"], str(d["attempts"]),
               str(d["last_status"] or "-"), hms(d["next_at"]) if d["status"] == "pending" else "-",
               (d["last_error"] or "")[:60]])


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())


def event_line(e: dict[str, Any]) -> str:
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


def print_disk(disk: dict[str, Any]) -> None:
    """Disk use under instaclone's directories, per source (part of ``instaclone status``)."""
    rows = [[s["source"], str(s["clones"]), size(s["deltas_bytes"]), size(s["clones_bytes"]),
             size(s["retained_bytes"]), size(s["frozen_bytes"]), size(s["bytes"])] for s in disk["sources"]]
    table(rows, ["SOURCE", "CLONES", "DELTAS", "CLONE FILES", "RETAINED", "FROZEN", "TOTAL"])
    print(f"total: {size(disk['total_bytes'])} ({size(disk['other_bytes'])} in no source's files)")
