"""scripts/lib/platform.sh and the platform choice of scripts/setup.sh, on fake dpkg, apt and daemons.

What setup decides from /etc/debian_version, INSTACLONE_PLATFORM and what
dpkg says is installed: which packages it installs and how it names them,
the backports source, the refusal to go back to Debian 12's own packages
over installed backports (and the command it prints instead), when a running
libvirtd or virtlogd is stale, and the QEMU 7.2 kept beside the platform's.
The real installs were run by hand on a Debian 12 chroot (issue 23's note);
here only what needs no network and changes nothing on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.host import REPO

LIB = REPO / "scripts" / "lib"
SETUP = REPO / "scripts" / "setup.sh"

BPO_QEMU = "1:10.0.2+ds-2+deb13u1~bpo12+1"
BPO_LIBVIRT = "11.3.0-2~bpo12+1"
M = "http://m.example/debian"  # a mirror
MADISON = {
    "qemu-system-x86": f"""qemu-system-x86 | {BPO_QEMU} | {M} bookworm-backports/main amd64 Packages
qemu-system-x86 | 1:7.2+dfsg-7+deb12u18+b3 | {M} bookworm/main amd64 Packages
qemu-system-x86 | 1:7.2+dfsg-7+deb12u15 | {M}-security bookworm-security/main amd64 Packages
""",
    "qemu-system-common": f"""qemu-system-common | {BPO_QEMU} | {M} bookworm-backports/main amd64 Packages
qemu-system-common | 1:7.2+dfsg-7+deb12u18+b3 | {M} bookworm/main amd64 Packages
""",
    "qemu-system-data": f"""qemu-system-data | {BPO_QEMU} | {M} bookworm-backports/main all Packages
qemu-system-data | 1:7.2+dfsg-7+deb12u18 | {M} bookworm/main all Packages
""",
    "seabios": f"""   seabios | 1.16.3-2~bpo12+1 | {M} bookworm-backports/main amd64 Packages
   seabios |   1.16.2-1 | {M} bookworm/main amd64 Packages
""",
    "libvirt0": f""" libvirt0 | {BPO_LIBVIRT} | {M} bookworm-backports/main amd64 Packages
 libvirt0 | 9.0.0-4+deb12u2 | {M} bookworm/main amd64 Packages
""",
    # Only in backports: libvirt 11 split it out of libvirt0.
    "libvirt-common": f"""libvirt-common | {BPO_LIBVIRT} | {M} bookworm-backports/main amd64 Packages
""",
}
PLATFORM_PKGS = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils", "libvirt-daemon-system",
                 "libvirt-daemon-system-systemd", "libvirt-clients", "libvirt-dev", "libvirt0", "libvirt-daemon",
                 "libvirt-daemon-driver-qemu", "libvirt-daemon-config-network", "libvirt-daemon-config-nwfilter",
                 "seabios"]


class Host:
    """A fake Debian host for platform.sh: dpkg's database, apt's lists, the daemons, /etc files."""

    def __init__(self, root: Path, release: str = "12.11") -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.dpkg = root / "dpkg"  # one file per installed package: its version
        self.dpkg.mkdir()
        self.madison = root / "madison"
        self.madison.mkdir()
        for pkg, text in MADISON.items():
            (self.madison / pkg).write_text(text)
        (root / "debian_version").write_text(release + "\n")
        (root / "apt" / "sources.list.d").mkdir(parents=True)
        (root / "lists").mkdir()
        (root / "proc").mkdir()
        self.log = root / "calls"
        self.fake("dpkg-query", f"""
pkgdir={self.dpkg}
case $2 in
    *db:Status-Abbrev*)  # the listing of platform_backported
        for f in "$pkgdir"/*; do [ -e "$f" ] && printf 'ii  %s %s\\n' "$(basename "$f")" "$(cat "$f")"; done
        exit 0 ;;
esac
[ -f "$pkgdir/$3" ] || exit 1
printf 'install ok installed %s' "$(cat "$pkgdir/$3")"
""")
        self.fake("apt-cache", f'[ "$1" = madison ] && cat "{self.madison}/$2" 2>/dev/null; exit 0')
        self.fake("apt-get", f'echo "apt-get $*" >> {self.log}; [ "$1" = download ] && exit 100; exit 0')
        self.env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
                    "DEBIAN_VERSION_FILE": str(root / "debian_version"), "APT_ETC": str(root / "apt"),
                    "APT_LISTS_DIR": str(root / "lists"), "PROC": str(root / "proc")}
        self.env.pop("INSTACLONE_PLATFORM", None)

    def fake(self, name: str, body: str) -> None:
        exe = self.bin / name
        exe.write_text(f"#!/bin/bash\n{body}\n")
        exe.chmod(0o755)

    def install(self, version_of: dict[str, str]) -> None:
        for pkg, version in version_of.items():
            (self.dpkg / pkg).write_text(version)

    def sh(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f"set -euo pipefail; APT_SAY=t; . {LIB}/apt.sh; . {LIB}/platform.sh; "
                               + script], env={**self.env, **env}, capture_output=True, text=True, timeout=60)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def stock_versions() -> dict[str, str]:
    return {p: ("1:7.2+dfsg-7+deb12u18+b3" if p.startswith("qemu") else
                "1.16.2-1" if p == "seabios" else "9.0.0-4+deb12u2") for p in PLATFORM_PKGS}


def backport_versions() -> dict[str, str]:
    return {p: (BPO_QEMU if p.startswith("qemu") else "1.16.3-2~bpo12+1" if p == "seabios" else BPO_LIBVIRT)
            for p in [*PLATFORM_PKGS, "libvirt-common"]}


@pytest.mark.parametrize(("release", "choice", "platform"), [
    ("12.11", "", "backports"),
    ("12.11", "backports", "backports"),
    ("12.11", "stock", "stock"),
    ("13.2", "", "distribution"),
    ("13.2", "stock", "distribution"),
    ("13.2", "backports", "distribution"),
    ("trixie/sid", "", "distribution"),
])
def test_the_release_and_the_switch_choose(tmp_path: Path, release: str, choice: str, platform: str) -> None:
    host = Host(tmp_path, release)
    r = host.sh('platform_choose; echo "$PLATFORM|$PLATFORM_TEXT"', INSTACLONE_PLATFORM=choice)
    assert r.returncode == 0, r.stderr
    got, text = r.stdout.strip().split("|")
    assert got == platform
    if platform == "distribution" and choice:
        assert f"INSTACLONE_PLATFORM={choice} chooses only on Debian 12" in text


def test_an_unknown_platform_is_refused_by_setup(host: Host) -> None:
    r = subprocess.run([str(SETUP)], env={**host.env, "INSTACLONE_PLATFORM": "qemu10"}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "INSTACLONE_PLATFORM must be 'backports' (the default on Debian 12) or 'stock', not 'qemu10'" in r.stderr
    assert host.calls() == []


def test_backports_replace_stock_packages_and_name_the_suite(host: Host) -> None:
    stock = stock_versions()
    del stock["libvirt-dev"]  # not installed at all
    host.install(stock)
    r = host.sh("platform_choose; mapfile -t m < <(platform_to_install); platform_install_args \"${m[@]}\"")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"{p}/bookworm-backports" for p in PLATFORM_PKGS]


def test_backports_installed_need_nothing(host: Host) -> None:
    host.install(backport_versions())
    r = host.sh("platform_choose; platform_to_install")
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_stock_needs_only_what_is_missing_and_names_no_suite(host: Host) -> None:
    stock = stock_versions()
    del stock["seabios"]
    host.install(stock)
    r = host.sh("platform_choose; mapfile -t m < <(platform_to_install); platform_install_args \"${m[@]}\"",
                INSTACLONE_PLATFORM="stock")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["seabios"]


def test_the_stock_version_is_the_newest_outside_backports(host: Host) -> None:
    r = host.sh("for p in qemu-system-x86 qemu-system-data seabios libvirt-common no-such; do "
                'echo "$p=$(platform_stock_version $p)"; done')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3", "qemu-system-data=1:7.2+dfsg-7+deb12u18",
                                "seabios=1.16.2-1", "libvirt-common=", "no-such="]


def test_stock_over_installed_backports_is_refused_with_the_command_back(host: Host) -> None:
    host.install({"qemu-system-x86": BPO_QEMU, "libvirt0": BPO_LIBVIRT, "libvirt-common": BPO_LIBVIRT,
                  "seabios": "1.16.3-2~bpo12+1", "bash": "5.2.15-2+b7"})
    r = subprocess.run([str(SETUP)], env={**host.env, "INSTACLONE_PLATFORM": "stock"}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "INSTACLONE_PLATFORM=stock, but QEMU and libvirt from bookworm-backports are installed" in r.stderr
    assert f"    qemu-system-x86 {BPO_QEMU}" in r.stderr and "bash" not in r.stderr
    assert ("apt-get install --allow-downgrades --no-install-recommends libvirt-common- "
            "libvirt0=9.0.0-4+deb12u2 qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3 seabios=1.16.2-1") in r.stderr
    assert host.calls() == []  # nothing installed, nothing removed


def test_the_command_back_resolves_on_this_host() -> None:
    """Where this host has the backports, apt-get resolves the printed downgrade (simulated: -s)."""
    if shutil.which("apt-get") is None or not list(Path("/var/lib/apt/lists").glob("*bookworm-backports*Packages*")):
        pytest.skip("no bookworm-backports package list on this host")
    r = subprocess.run(["bash", "-c", f". {LIB}/apt.sh; . {LIB}/platform.sh; platform_backported | head -n 1; "
                        "platform_downgrade_command"], capture_output=True, text=True, timeout=120)
    if not r.stdout.strip().splitlines()[0:1] or r.stdout.startswith("apt-get"):
        pytest.skip("no QEMU or libvirt backport installed on this host")
    command = r.stdout.strip().splitlines()[-1].split()
    assert command[:2] == ["apt-get", "install"]
    sim = subprocess.run([*command[:2], "-s", *command[2:]], capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr
    assert "Inst qemu-system-x86 [" in sim.stdout and "(1:7.2" in sim.stdout
    # Only the platform's own packages move.
    moved = [line.split()[1] for line in sim.stdout.splitlines() if line.startswith(("Inst ", "Remv "))]
    assert all(p.startswith(("qemu-", "libvirt", "seabios")) for p in moved), moved


@pytest.mark.parametrize(("existing", "added"), [
    ({}, True),
    ({"sources.list": "deb http://deb.debian.org/debian bookworm-backports main\n"}, False),
    ({"sources.list": "# deb http://deb.debian.org/debian bookworm-backports main\n"}, True),
    ({"sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.example/debian\n"
                                       "Suites: bookworm bookworm-updates bookworm-backports\nComponents: main\n"},
     False),
    ({"sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.example/debian\n"
                                       "Suites: bookworm bookworm-updates\nComponents: main\n"}, True),
])
def test_the_backports_source_is_added_only_where_none_names_it(host: Host, existing: dict[str, str],
                                                                  added: bool) -> None:
    apt = host.root / "apt"
    for name, text in existing.items():
        (apt / name).write_text(text)
    r = host.sh("platform_backports_source && echo added || echo listed",
                INSTACLONE_DEBIAN_MIRROR="http://mirror.example/debian")
    assert r.stdout.strip() == ("added" if added else "listed"), r.stderr
    written = apt / "sources.list.d" / "backports.sources"
    assert written.exists() == added
    if added:
        assert written.read_text() == ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\n"
                                       "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        again = host.sh("platform_backports_source && echo added || echo listed")
        assert again.stdout.strip() == "listed"


@pytest.mark.parametrize(("running", "installed", "exe", "why"), [
    ("11.3.0", "11.3.0", "/usr/sbin/libvirtd", ""),
    ("9.0.0", "11.3.0", "/usr/sbin/libvirtd", "libvirtd 9.0.0 runs, 11.3.0 is installed"),
    ("11.3.0", "11.3.0", "/usr/sbin/libvirtd (deleted)",
     "libvirtd runs a program the packages replaced (/usr/sbin/libvirtd (deleted))"),
    (None, "11.3.0", None, ""),  # none runs: setup starts it
])
def test_a_stale_libvirtd(host: Host, running: str | None, installed: str, exe: str | None, why: str) -> None:
    host.fake("pgrep", "[ -e \"$PROC/4242/exe\" ] || [ -L \"$PROC/4242/exe\" ] && echo 4242 || exit 1")
    host.fake("virsh", f'echo "Running against daemon: {running}"')
    host.fake("libvirtd", f'echo "libvirtd (libvirt) {installed}"')
    if exe is not None:
        (host.root / "proc" / "4242").mkdir()
        (host.root / "proc" / "4242" / "exe").symlink_to(exe)
    r = host.sh("platform_stale_daemon libvirtd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == why


def test_a_virtlogd_whose_program_was_replaced_is_stale(host: Host) -> None:
    host.fake("pgrep", "echo 77")
    (host.root / "proc" / "77").mkdir()
    (host.root / "proc" / "77" / "exe").symlink_to("/usr/sbin/virtlogd (deleted)")
    r = host.sh("platform_stale_daemon virtlogd")
    assert r.stdout.strip() == "virtlogd runs a program the packages replaced (/usr/sbin/virtlogd (deleted))"
    (host.root / "proc" / "77" / "exe").unlink()
    (host.root / "proc" / "77" / "exe").symlink_to("/usr/sbin/virtlogd")
    assert host.sh("platform_stale_daemon virtlogd").stdout == ""


def test_qemu_7_2_present_is_left_alone(host: Host) -> None:
    """Made before from the same versions the same way: nothing downloaded. Else: made again."""
    d = host.root / "opt" / "qemu-7.2"
    d.mkdir(parents=True)
    (d / "qemu-system-x86_64").write_text("#!/bin/sh\n")
    (d / "qemu-system-x86_64").chmod(0o755)
    want = ("qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3 qemu-system-common=1:7.2+dfsg-7+deb12u18+b3 "
            "qemu-system-data=1:7.2+dfsg-7+deb12u18")
    (d / ".instaclone-packages").write_text(want + " wrapper=2\n")
    r = host.sh(f'platform_qemu72 {d}; echo "$PLATFORM_QEMU72"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"present in {d} ({want})" and host.calls() == []

    (d / ".instaclone-packages").write_text(want + " wrapper=1\n")
    r = host.sh(f'platform_qemu72 {d} || echo "failed: $PLATFORM_QEMU72"')
    # The fake apt-get download fails (twice: apt_retry updates the lists once): the old copy stays.
    assert r.stdout.strip().startswith("failed"), r.stdout + r.stderr
    assert host.calls() == [f"apt-get download -qq {want}", "apt-get update -qq", f"apt-get download -qq {want}"]
    assert (d / "qemu-system-x86_64").exists()


def test_qemu_7_2_needs_debian_12_lists(host: Host) -> None:
    (host.madison / "qemu-system-common").write_text(MADISON["qemu-system-common"].splitlines()[0] + "\n")
    r = host.sh(f'platform_qemu72 {host.root}/opt/q || echo "$PLATFORM_QEMU72"')
    assert r.stdout.strip() == "not made: the package lists have no Debian 12 QEMU 7.2 qemu-system-common (none)"
    r = host.sh('platform_qemu72 relative/dir || echo "$PLATFORM_QEMU72"')
    assert r.stdout.strip() == "not made: 'relative/dir' is not an absolute path"


def test_install_names_backports_adds_the_source_and_fetches_its_list(host: Host) -> None:
    """Debian 12 with its own QEMU and libvirt, no backports source, a tool missing: one apt-get install."""
    host.install({**stock_versions(), "gcc": "4:12.2.0-3"})
    (host.root / "lists" / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("")
    host.fake("apt-cache", f'[ "$1" = madison ] && cat "{host.madison}/$2" 2>/dev/null; '
                           '[ "$1" = policy ] && printf "%s:\\n  Candidate: 1\\n  Version table:\\n     1 500\\n'
                           '        500 http://m.example/debian bookworm/main amd64 Packages\\n" "$2"; exit 0')
    r = host.sh("platform_choose; platform_install -qq --no-install-recommends -- gcc zsh")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"t: added the apt source {host.root}/apt/sources.list.d/backports.sources (bookworm-backports)",
        "t: apt-get update (no bookworm-backports package list yet)",
        "t: installing zsh " + " ".join(f"{p}/bookworm-backports" for p in PLATFORM_PKGS)]
    assert host.calls() == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef "
        "-o Dpkg::Options::=--force-confold zsh " + " ".join(f"{p}/bookworm-backports" for p in PLATFORM_PKGS)]


def test_install_with_everything_present_runs_no_apt(host: Host) -> None:
    host.install({**backport_versions(), "gcc": "4:12.2.0-3"})
    r = host.sh("platform_choose; platform_install -qq -- gcc")
    assert r.returncode == 0 and r.stdout == "t: packages present\n", r.stdout + r.stderr
    assert host.calls() == []
