"""Debian packages the service tests run for real (SLURM, PostgreSQL, Chromium): installed with
apt-get when missing, as CI does (it runs as root); a machine that cannot install them skips those
tests and says which package was missing."""

import os
import shutil
import subprocess

import pytest

APT_TIMEOUT = 900  # seconds: Chromium is the largest, about 100 MB


def _missing(packages) -> list[str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages], capture_output=True, text=True
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def require_debian_packages(*packages: str) -> None:
    """Install ``packages`` with apt-get unless they are installed (index refreshed once if a package
    is not found); skip the test where that is impossible (no dpkg, not root)."""
    if not shutil.which("dpkg-query"):
        pytest.skip(f"not a Debian system: {', '.join(packages)} cannot be installed here")
    missing = _missing(packages)
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} not installed and apt-get needs root: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=APT_TIMEOUT)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
    output = proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{output}"
