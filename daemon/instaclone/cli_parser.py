"""The ``instaclone`` command line: every command, option and help text, in one parser.

The parser is the single source of the CLI's shape: ``main`` dispatches on it, ``instaclone help``
and the man page (``cli_help``) are printed from it, and the completion scripts (``cli_complete``)
are generated from it. ``-o`` and ``-q`` are accepted before the command and after it
(``instaclone -q clones ls`` and ``instaclone clones ls -q``), like docker's and podman's.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import __version__, cli_pools
from .cli_output import FORMATS

DEFAULT_SOCKET = "/run/instaclone/control.sock"

#: Positional arguments naming things the daemon knows: ``dest`` -> completion kind.
#: ``cli_complete`` offers the daemon's names for them (``instaclone __complete KIND``).
COMPLETE: dict[str, str] = {"source": "source", "job_id": "job", "job": "job", "clone": "clone", "pool": "pool"}


def _output_options(p: argparse.ArgumentParser, top: bool) -> None:
    # On the subcommands the defaults are SUPPRESS, so an option given before the command is not
    # overwritten by the subcommand's default.
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-o", "--output", choices=FORMATS, **({"default": "table"} if top else kw),
                   help="table (default), wide (more columns), json or yaml")
    p.add_argument("-q", "--quiet", action="store_true", **({"default": False} if top else kw),
                   help="print only ids or names (one a line), for scripts")


class _Sub:
    """``add_parser`` with the output options on every command."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        if "help" in kw and "description" not in kw:
            kw["description"] = kw["help"]
        p: argparse.ArgumentParser = self.sub.add_parser(name, **kw)
        _output_options(p, top=False)
        return p

    def nested(self, p: argparse.ArgumentParser, dest: str) -> _Sub:
        return _Sub(p.add_subparsers(dest=dest, required=True, metavar="COMMAND"))


def _clone_parser(sub: _Sub) -> None:
    c = sub.add_parser("clone", help="instant-clone a running or paused VM")
    c.add_argument("source", help="the VM to clone (a libvirt domain)")
    c.add_argument("--name", required=True, help="clone name; with --count > 1, the prefix of NAME-1..NAME-K")
    c.add_argument("--count", type=int, default=1, help="how many clones (one stun for all)")
    c.add_argument("--wait", action="store_true",
                   help="wait until the job ends, showing each state as it is reached (exit 1 unless "
                        "every clone is ready)")
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
    c.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds to wait with --wait")
    c.add_argument("--ttl", type=float, metavar="S", help="the daemon destroys each clone S seconds after it is ready")


def _source_parsers(sub: _Sub) -> None:
    """Commands on a source: freeze, unfreeze, check, prepare."""
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


def _inside_parsers(sub: _Sub) -> None:
    """Commands inside a clone, through its guest agent: exec and cp."""
    ex = sub.add_parser("exec", help="run a command inside a clone (exit status: the command's)",
                        usage="instaclone exec [-i] [--env K=V] [--timeout S] CLONE -- CMD [ARG...]")
    ex.add_argument("clone", help="a clone made by instaclone")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD", help="the command and its arguments")
    ex.add_argument("-i", "--interactive", action="store_true", help="send this command's stdin to the command")
    ex.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable; repeatable")
    ex.add_argument("--timeout", type=float, default=300.0, metavar="S",
                    help="kill the command after S seconds (default 300; exit 124)")
    cp = sub.add_parser("cp", help="copy a file into or out of a clone (CLONE:/path on one side; '-': stdin/stdout)",
                        usage="instaclone cp SRC DST   (one of them CLONE:/abs/path)")
    cp.add_argument("src", help="a local file, '-' (stdin) or CLONE:/abs/path")
    cp.add_argument("dst", help="a local file or directory, '-' (stdout) or CLONE:/abs/path")
    cp.add_argument("--mode", help="file mode in the guest (octal, e.g. 0755; default 0644)")


def _events_parser(sub: _Sub) -> None:
    ev = sub.add_parser("events", help="show events (state changes); -f follows new ones")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    ev.add_argument("--job", help="only this job's events")
    ev.add_argument("--type", action="append", default=[], metavar="TYPE",
                    help="event type or glob (clone.ready, clone.*); repeatable")
    ev.add_argument("--since", type=int, metavar="CURSOR", help="events after this cursor (see -o json)")
    ev.add_argument("--tail", type=int, default=20, help="how many past events to show first (default 20)")


def _webhooks_parser(sub: _Sub) -> None:
    wh = sub.add_parser("webhooks", help="webhook endpoints and their deliveries")
    whsub = sub.nested(wh, "webhooks_cmd")
    whsub.add_parser("ls", help="endpoints from the config, with delivery counts")
    we = whsub.add_parser("enable", help="re-enable an endpoint that answered 410 Gone")
    we.add_argument("name")
    dl = whsub.add_parser("deliveries", help="list or replay deliveries")
    dlsub = whsub.nested(dl, "deliveries_cmd")
    dls = dlsub.add_parser("ls", help="deliveries, newest first")
    dlr = dlsub.add_parser("replay", help="send deliveries again (same event id)")
    dlr.add_argument("ids", nargs="*", type=int, help="delivery ids")
    for sp in (dls, dlr):
        sp.add_argument("--status", choices=("pending", "delivered", "failed", "disabled"))
        sp.add_argument("--webhook", help="endpoint name")
        sp.add_argument("--event", help="event id")
    dls.add_argument("--job", help="job id")
    dls.add_argument("--limit", type=int, default=50)


def _meta_parsers(sub: _Sub) -> None:
    """Commands about the CLI itself: help and completion."""
    h = sub.add_parser("help", help="help on a command or topic; --man prints the man page")
    h.add_argument("topic", nargs="*", help="a command (e.g. 'pool claim') or a topic: exit-codes, output, "
                                            "completion, environment")
    h.add_argument("--man", action="store_true", help="the whole manual as a roff man page (instaclone.1)")
    c = sub.add_parser("completion", help="print the shell completion script: eval \"$(instaclone completion bash)\"")
    c.add_argument("shell", choices=("bash", "zsh"))


def parser() -> argparse.ArgumentParser:
    """The whole command line (argparse exits 2 on a usage error)."""
    p = argparse.ArgumentParser(prog="instaclone", description="instant clones of running libvirt VMs",
                                epilog="'instaclone help TOPIC' for more: exit-codes, output, completion")
    p.add_argument("--version", action="version", version=f"instaclone {__version__}")
    p.add_argument("--socket", default=os.environ.get("INSTACLONE_SOCKET", DEFAULT_SOCKET),
                   help="control socket of instacloned (env INSTACLONE_SOCKET)")
    _output_options(p, top=True)
    sub = _Sub(p.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
    _clone_parser(sub)
    j = sub.add_parser("jobs", help="list or show clone jobs")
    jsub = sub.nested(j, "jobs_cmd")
    jsub.add_parser("ls", help="all jobs")
    js = jsub.add_parser("show", help="one job with its states and their times")
    js.add_argument("job_id")
    js.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the job to end")
    cl = sub.add_parser("clones", help="list clones")
    clsub = sub.nested(cl, "clones_cmd")
    clsub.add_parser("ls", help="clones made by instaclone, with their state")
    d = sub.add_parser("destroy", help="power off and delete a clone and its files (those its own clones "
                                       "use stay until they are unused)")
    d.add_argument("clone")
    _source_parsers(sub)
    sub.add_parser("frozen", help="list frozen sources")
    sub.add_parser("status", help="daemon status, disk used per source")
    g = sub.add_parser("gc", help="delete the delta and memory images no domain's backing chain uses")
    g.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    _events_parser(sub)
    _webhooks_parser(sub)
    cli_pools.add_parsers(sub)
    _inside_parsers(sub)
    _meta_parsers(sub)
    return p


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The direct subcommands of ``p`` by name (empty if it has none)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


Command = tuple[tuple[str, ...], argparse.ArgumentParser]


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Command]:
    """Every command under ``p``, depth first: ``[((), p), (("jobs",), jobs), (("jobs", "ls"), ls), ...]``."""
    out = [(path, p)]
    for name, child in subcommands(p).items():
        out.extend(walk(child, (*path, name)))
    return out


def help_of(p: argparse.ArgumentParser, name: str) -> str:
    """The one-line help of subcommand ``name`` of ``p``."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""

