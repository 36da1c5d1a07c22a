"""scripts/install-service.sh and scripts/lib/apt.sh, run for real in temp prefixes.

systemd is not PID 1 on these machines: ``systemctl`` is a recording fake on
PATH (it keeps which units are "active"), so what the installer decides on a
first install and on re-runs is checked, not what systemd then does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.host import REPO as ROOT
from tests.support.installlib import INSTALLER, Install

APT_LIB = ROOT / "scripts" / "lib" / "apt.sh"


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    return Install(tmp_path_factory.mktemp("install"))


@pytest.fixture(scope="module")
def first(install: Install) -> tuple[str, list[str]]:
    return install.run()


def test_first_install_starts_the_service_and_restarts_libvirtd_for_the_new_hook(
        install: Install, first: tuple[str, list[str]]) -> None:
    out, calls = first
    assert "config OK" in out
    assert "restart libvirtd.service" in calls
    assert "daemon-reload" in calls
    assert "start instacloned.socket instacloned.service" in calls
    assert not any(c.startswith("restart instacloned") for c in calls)
    assert os.access(install.root / "hooks" / "instaclone", os.X_OK)
    r = subprocess.run([str(install.root / "bin" / "instaclone"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "webhooks" in r.stdout


def test_installed_units_verify_and_name_the_prefix(install: Install, first: tuple[str, list[str]]) -> None:
    units = install.root / "units"
    service = (units / "instacloned.service").read_text()
    exe, conf = install.root / "opt" / ".venv" / "bin" / "instacloned", install.root / "etc" / "instaclone.toml"
    assert f"ExecStart={exe} --config {conf}" in service
    assert re.findall(r"^ExecReload=(.*)$", service, flags=re.M) == [
        f"{exe} --check-config --config {conf}", "/bin/kill -HUP $MAINPID"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (package systemd)")
    v = subprocess.run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=no",
                        str(units / "instacloned.service"), str(units / "instacloned.socket")],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "instacloned" not in v.stderr, v.stderr


def test_every_documentation_uri_is_installed(install: Install, first: tuple[str, list[str]]) -> None:
    """What "systemctl help instacloned" opens exists after an install."""
    seen = 0
    for unit in ("instacloned.service", "instacloned.socket"):
        text = (install.root / "units" / unit).read_text()
        for line in re.findall(r"^Documentation=(.*)$", text, flags=re.M):
            for uri in line.split():
                seen += 1
                if m := re.fullmatch(r"man:([\w.-]+)\((\d)\)", uri):
                    page = install.root / "man" / f"man{m.group(2)}" / f"{m.group(1)}.{m.group(2)}"
                    assert page.is_file(), f"{unit}: {uri} -> {page} not installed"
                    if shutil.which("man"):
                        r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                                           env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"})
                        assert r.returncode == 0 and "instacloned" in r.stdout and not r.stderr.strip(), r.stderr
                elif uri.startswith("file:///usr/share/doc/instaclone/"):
                    path = install.root / "doc" / uri.removeprefix("file:///usr/share/doc/instaclone/")
                    assert path.is_file(), f"{unit}: {uri} not installed"
                else:
                    assert uri.startswith("https://"), f"{unit}: {uri} is neither installed nor a web page"
    assert seen >= 4


def test_installed_readme_links_resolve(install: Install, first: tuple[str, list[str]]) -> None:
    """The installed README's links into docs/ lead to installed pages."""
    doc = install.root / "doc"
    links = re.findall(r"\]\((docs/[^)#]+)", (doc / "README.md").read_text())
    assert links and all((doc / link).is_file() for link in links), [x for x in links if not (doc / x).is_file()]


def test_rerun_without_changes_restarts_nothing(install: Install, first: tuple[str, list[str]]) -> None:
    out, calls = install.run()
    assert "instacloned left running (code and units unchanged)" in out
    assert "libvirtd not restarted (hook unchanged)" in out
    assert not [c for c in calls if c.startswith(("restart", "start"))], calls


def test_rerun_after_code_and_hook_changed_restarts_both(install: Install, first: tuple[str, list[str]]) -> None:
    # As after a git pull: the installed files differ from the checkout's.
    installed = next((install.root / "opt" / ".venv" / "lib").glob("python*/site-packages/instaclone/daemon.py"))
    installed.write_text(installed.read_text() + "\n# older code\n")
    hook = install.root / "hooks" / "instaclone"
    hook.write_text(hook.read_text() + "\n# older hook\n")
    out, calls = install.run()
    assert "restart instacloned.service" in calls and "restart libvirtd.service" in calls, calls
    assert "restarting instacloned (its code or units changed)" in out
    assert "older code" not in installed.read_text() and "older hook" not in hook.read_text()


def test_rerun_after_unit_changed_restarts_only_the_daemon(install: Install, first: tuple[str, list[str]]) -> None:
    unit = install.root / "units" / "instacloned.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSec=60"))
    _, calls = install.run()
    assert calls.index("daemon-reload") < calls.index("restart instacloned.service"), calls
    assert "restart libvirtd.service" not in calls
    assert "WatchdogSec=30" in unit.read_text()


def test_packages_on_a_host_with_empty_lists(install: Install, first: tuple[str, list[str]],
                                              tmp_path: Path) -> None:
    """No package lists (a fresh host): apt-get update once, then the missing packages install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    fakes = {
        # qemu-utils is "missing"; the rest installed.
        "dpkg-query": '[ "$3" = qemu-utils ] && exit 1; echo "install ok installed"',
        "apt-cache": "exit 0",  # no lists: policy knows nothing
        "apt-get": f'echo "$*" >> {log}',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    # A release whose own QEMU and libvirt are the platform (tests/ops/test_setup_platform.py has Debian 12's).
    (tmp_path / "debian_version").write_text("13.2\n")
    env = {**install.env, "PATH": f"{bin_dir}:{install.env['PATH']}", "APT_LISTS_DIR": str(tmp_path / "lists"),
           "DEBIAN_VERSION_FILE": str(tmp_path / "debian_version"), "APT_ETC": str(tmp_path / "apt")}
    r = subprocess.run([str(INSTALLER), "--no-start"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"apt-get update (no package lists in {tmp_path}/lists)" in r.stdout
    assert log.read_text().splitlines() == [
        "update -qq",
        "install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold qemu-utils"]


def test_no_start_touches_no_service(install: Install, first: tuple[str, list[str]]) -> None:
    out, calls = install.run("--no-start")
    assert "not started (--no-start)" in out and calls == []


# -- apt-get update when the lists cannot serve a download ------------------------------------

POLICY = {
    # Installed, and in the lists: downloadable.
    "listed": """listed:
  Installed: 1:1.35.0-4
  Candidate: 1:1.35.0-4
  Version table:
 *** 1:1.35.0-4 500
        500 http://mirror.example/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
""",
    # Installed but in no list (empty lists): "Can't find a source to download version".
    "status-only": """status-only:
  Installed: 1:1.35.0-4
  Candidate: 1:1.35.0-4
  Version table:
 *** 1:1.35.0-4 100
        100 /var/lib/dpkg/status
""",
    # A newer version listed, the candidate; an older one installed.
    "upgradable": """upgradable:
  Installed: 1.0-1
  Candidate: 1.1-1
  Version table:
     1.1-1 500
        500 http://mirror.example/debian bookworm/main amd64 Packages
 *** 1.0-1 100
        100 /var/lib/dpkg/status
""",
    "none": """none:
  Installed: (none)
  Candidate: (none)
  Version table:
""",
}


@pytest.fixture
def fake_apt(tmp_path: Path) -> dict[str, str]:
    """PATH with a fake apt-cache (answers POLICY) and apt-get (logs; "download" fails until "update")."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in POLICY.items():
        (tmp_path / f"policy-{name}").write_text(text)
    (bin_dir / "apt-cache").write_text(f"""#!/bin/sh
[ "$1" = policy ] && [ -f "{tmp_path}/policy-$2" ] && exec cat "{tmp_path}/policy-$2"
exit 0
""")
    (bin_dir / "apt-get").write_text(f"""#!/bin/sh
echo "$*" >> "{tmp_path}/apt-get.log"
case $1 in
    update) touch "{tmp_path}/updated" ;;
    download) [ -e "{tmp_path}/updated" ] || {{ echo "E: 404 Not Found" >&2; exit 100; }} ;;
esac
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "mirror_dists_bookworm_main_binary-amd64_Packages.lz4").write_text("")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "APT_LISTS_DIR": str(lists),
            "LOG": str(tmp_path / "apt-get.log")}


def apt_sh(env: dict[str, str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; . {APT_LIB}; {script}"], env=env,
                          capture_output=True, text=True, timeout=30)


def apt_get_calls(env: dict[str, str]) -> list[str]:
    log = Path(env["LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize(("packages", "lacking"), [
    (["listed"], None),
    (["upgradable"], None),
    (["listed", "upgradable"], None),
    (["status-only"], "status-only"),
    (["none"], "none"),
    (["unknown-package"], "unknown-package"),
    (["listed", "status-only"], "status-only"),
])
def test_lists_lack_a_package(fake_apt: dict[str, str], packages: list[str], lacking: str | None) -> None:
    r = apt_sh(fake_apt, f'if apt_lists_lack {" ".join(packages)}; then echo "LACK $APT_WHY"; else echo OK; fi')
    assert r.returncode == 0, r.stderr
    if lacking is None:
        assert r.stdout.strip() == "OK"
    else:
        assert r.stdout.strip() == f"LACK the package lists have no downloadable candidate for {lacking}"


def test_no_lists_at_all_need_an_update(fake_apt: dict[str, str], tmp_path: Path) -> None:
    env = {**fake_apt, "APT_LISTS_DIR": str(tmp_path / "empty")}
    r = apt_sh(env, 'APT_SAY=t; apt_ensure_lists listed; echo "updated=$APT_UPDATED"')
    assert r.returncode == 0, r.stderr
    assert f"t: apt-get update (no package lists in {tmp_path}/empty)" in r.stdout
    assert "updated=1" in r.stdout and apt_get_calls(env) == ["update -qq"]


def test_ensure_lists_updates_only_when_needed(fake_apt: dict[str, str]) -> None:
    r = apt_sh(fake_apt, "apt_ensure_lists listed upgradable")
    assert r.returncode == 0 and r.stdout == "" and apt_get_calls(fake_apt) == []
    r = apt_sh(fake_apt, "apt_ensure_lists listed status-only")
    assert r.returncode == 0 and "apt-get update (the package lists have no downloadable candidate for status-only)" \
        in r.stdout
    assert apt_get_calls(fake_apt) == ["update -qq"]


def test_retry_updates_once_after_a_failed_download(fake_apt: dict[str, str]) -> None:
    """Stale lists: the candidate is listed but the mirror no longer has it (404) until an update."""
    r = apt_sh(fake_apt, "apt_retry apt-get download -qq listed")
    assert r.returncode == 0, r.stderr
    assert "failed; apt-get update (the lists may be stale) and once more" in r.stderr
    assert apt_get_calls(fake_apt) == ["download -qq listed", "update -qq", "download -qq listed"]


def test_retry_does_not_update_twice(fake_apt: dict[str, str], tmp_path: Path) -> None:
    r = apt_sh(fake_apt, "APT_UPDATED=1; apt_retry apt-get download -qq listed")
    assert r.returncode != 0
    assert apt_get_calls(fake_apt) == ["download -qq listed"]


def test_real_apt_cache_output_parses() -> None:
    """On this host's real lists: a package Debian has is downloadable, a made-up one is not."""
    if shutil.which("apt-cache") is None or not list(Path("/var/lib/apt/lists").glob("*_Packages*")):
        pytest.skip("no apt lists on this host")
    r = apt_sh(dict(os.environ), "apt_lists_lack bash && echo LACK || echo OK; "
                                 "apt_lists_lack no-such-package-ic && echo LACK || echo OK")
    assert r.stdout.split() == ["OK", "LACK"], r.stdout + r.stderr


def test_scripts_that_download_use_the_helper() -> None:
    for script in ("build-guest.sh", "build-debian-guest.sh", "install-promtool.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "lib/apt.sh" in text and "apt_ensure_lists" in text, script
    assert "apt_retry apt-get download" in (ROOT / "scripts" / "install-promtool.sh").read_text()
    # The installers install through the platform's helper, which uses apt.sh's.
    for script in ("install-service.sh", "setup.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "lib/apt.sh" in text and "lib/platform.sh" in text and "platform_install " in text, script
        assert "apt-get install" not in text, script
    platform = (ROOT / "scripts" / "lib" / "platform.sh").read_text()
    assert "apt_ensure_lists" in platform and "apt_retry apt-get install" in platform
    assert "apt_retry apt-get download" in platform
