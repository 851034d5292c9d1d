"""Setup never breaks apt: bookworm-backports comes through a private apt state.

A machine may already list bookworm-backports with its own options (signed-by=…). The test
gives apt such a configuration of its own (APT_CONFIG: sources, parts, lists in a temporary
directory), runs setup's backports step against it (scripts/apt-backports.sh, download only) and
checks that apt still reads those sources afterwards and that nothing was added to them. Needs
root and the Debian mirror (the lists are the project cache's, refreshed, not fetched anew).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("MLSCHED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root")


def listing(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_backports_step_leaves_an_existing_backports_source_working(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    for d in ("sources.list.d", "apt.conf.d", "preferences.d"):
        (etc / d).mkdir(parents=True)
    (etc / "sources.list.d" / "debian.list").write_text(
        f"deb [signed-by={KEYRING}] {MIRROR} bookworm main\n"
        f"deb [signed-by={KEYRING}] {MIRROR} bookworm-backports main\n")
    (etc / "sources.list").write_text("")
    for d in ("lists/partial", "cache/archives/partial"):
        (tmp_path / d).mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::Etc "{etc}";\nDir::State::Lists "{tmp_path}/lists";\n'
                    f'Dir::Cache "{tmp_path}/cache";\nAPT::Sandbox::User "root";\n')
    env = dict(os.environ, APT_CONFIG=str(conf))
    before = listing(etc)

    step = subprocess.run(["bash", "scripts/apt-backports.sh", "--download-only", "libbpf1"],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert step.returncode == 0, step.stdout + step.stderr

    assert listing(etc) == before, "setup's backports step changed apt's sources"
    update = subprocess.run(["apt-get", "-q", "update"], env=env, text=True,
                            capture_output=True, timeout=600)
    assert "Conflicting values" not in update.stderr, update.stderr
    assert update.returncode == 0, update.stderr
