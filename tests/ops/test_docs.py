"""The documentation: generated pages match the code, and the README's links resolve.

The site itself (every page, link and anchor) is built with ``mkdocs build --strict``
by scripts/lint.sh, part of the test command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_reference_is_up_to_date() -> None:
    """docs/reference/cli.md is what scripts/gen-cli-reference.py prints from the CLI's parser."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-cli-reference.py"), "--check"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr  # the message says which command regenerates it


def test_cli_reference_check_names_the_command(tmp_path: Path) -> None:
    """A stale page fails the check with the command that fixes it, and the check writes nothing."""
    page = REPO / "docs" / "reference" / "cli.md"
    script = (REPO / "scripts" / "gen-cli-reference.py").read_text()
    copy = tmp_path / "scripts" / "gen-cli-reference.py"
    copy.parent.mkdir()
    copy.write_text(script)
    stale = tmp_path / "docs" / "reference" / "cli.md"
    stale.parent.mkdir(parents=True)
    stale.write_text(page.read_text().replace("## instaclone clone", "## instaclone klone"))
    run = subprocess.run([sys.executable, str(copy), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "docs/reference/cli.md is out of date" in run.stderr
    assert "scripts/gen-cli-reference.py" in run.stderr
    assert "klone" in stale.read_text()


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the repository (and a heading there, if any)."""
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert "://" not in link, f"the README cites a page outside the repository: {link}"
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.is_file(), link
        if anchor:
            slugs = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).strip().replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}
            assert anchor in slugs, link


def test_readme_is_short() -> None:
    """The README says what instaclone is, the two commands, a tour and links; the rest is in docs/."""
    assert len((REPO / "README.md").read_bytes()) <= 12 * 1024


def test_code_cites_only_pages_that_exist() -> None:
    """A comment, docstring or script that names a page under docs/ names one the repository has."""
    roots = ["daemon", "plugins", "tests", "scripts", "bench", "config", "systemd"]
    files = [p for root in roots for p in (REPO / root).rglob("*") if p.is_file() and p.suffix in
             (".py", ".sh", ".toml", ".md", ".yml", ".service", ".socket")]
    files += [REPO / "pyproject.toml", REPO / "README.md", REPO / "mkdocs.yml"]
    missing = sorted({f"{f.relative_to(REPO)}: {page}" for f in files
                      for page in re.findall(r"\bdocs/[\w./-]+\.md\b", f.read_text(errors="replace"))
                      if not (REPO / page).is_file()})
    assert not missing, missing
