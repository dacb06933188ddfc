"""systemd/install.sh in a temporary root: idempotent, never overwrites the config,
--dry-run changes nothing, the venv gets the runtime extra only."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "systemd" / "install.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")


def install(*args, env=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([BASH, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: type, permission bits, content hash, mtime of files."""
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", oct(st.st_mode & 0o7777))
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(p))
        else:
            out[rel] = ("f", oct(st.st_mode & 0o7777), hashlib.sha256(p.read_bytes()).hexdigest(),
                        st.st_mtime_ns)
    return out


def test_script_is_valid_bash():
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)
    assert SCRIPT.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in SCRIPT.read_text()
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)


def test_install_into_root(tmp_path):
    root = tmp_path / "root"
    r = install("--root", root)
    cfg = root / "etc/edge-inspect/config.toml"
    assert cfg.read_text() == (ROOT / "config.example.toml").read_text()
    assert oct(cfg.stat().st_mode & 0o777) == "0o640"
    unit = root / "etc/systemd/system/edge-inspect.service"
    assert unit.read_bytes() == (ROOT / "systemd/edge-inspect.service").read_bytes()
    for d in ("var/lib/edge-inspect/models", "var/lib/edge-inspect/images", "opt/edge-inspect"):
        assert (root / d).is_dir(), d
    assert oct((root / "var/lib/edge-inspect").stat().st_mode & 0o777) == "0o750"
    # nothing outside the root, no udev rules unless asked, no venv under --root
    assert not (root / "etc/udev").exists()
    assert not (root / "opt/edge-inspect/venv").exists()
    # what --root leaves out is said, not silently dropped
    out = r.stdout
    for step in ("useradd", "systemctl daemon-reload", "systemctl enable", "-m venv", "pip install"):
        assert any(line.startswith("skipped") and step in line for line in out.splitlines()), step
    assert "[runtime]" in out and "tensorflow" not in out.lower()


def test_second_run_changes_nothing_and_keeps_the_config(tmp_path):
    root = tmp_path / "root"
    install("--root", root, "--udev")
    first = snapshot(root)
    install("--root", root, "--udev")
    assert snapshot(root) == first          # same files, same modes, not even rewritten

    cfg = root / "etc/edge-inspect/config.toml"
    cfg.write_text('[station]\nid = "line7-cam2"\n')
    r = install("--root", root, "--udev")
    assert cfg.read_text() == '[station]\nid = "line7-cam2"\n'
    assert "kept" in r.stdout


def test_upgrade_replaces_a_changed_unit(tmp_path):
    root = tmp_path / "root"
    install("--root", root)
    unit = root / "etc/systemd/system/edge-inspect.service"
    unit.write_text("stale\n")
    install("--root", root)
    assert unit.read_bytes() == (ROOT / "systemd/edge-inspect.service").read_bytes()


def test_udev_rules(tmp_path):
    root = tmp_path / "root"
    install("--root", root, "--udev")
    rules = (root / "etc/udev/rules.d/99-edge-inspect.rules").read_text()
    assert 'SYMLINK+="edge-gate"' in rules
    for vid, pid in (("18d1", "9302"), ("1a6e", "089a")):
        line = next(l for l in rules.splitlines()
                    if f'ATTRS{{idVendor}}=="{vid}"' in l and not l.startswith("#"))
        assert f'ATTRS{{idProduct}}=="{pid}"' in line and 'GROUP="plugdev"' in line
    # every rule line is KEY op "value" pairs separated by commas
    for line in rules.splitlines():
        if line.strip() and not line.startswith("#"):
            for part in line.split(", "):
                assert any(op in part for op in ('==', '+=', '=')), part
                assert part.rstrip().endswith('"'), part


def test_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    r = install("--root", root, "--udev", "--dry-run")
    assert not root.exists()
    assert "would run: install -m 0640" in r.stdout          # the config it would create
    assert "would run: install -D -m 0644" in r.stdout       # the unit
    assert "99-edge-inspect.rules" in r.stdout

    install("--root", root, "--udev")
    before = snapshot(root)
    (root / "etc/systemd/system/edge-inspect.service").write_text("stale\n")
    before = snapshot(root)
    r = install("--root", root, "--udev", "--dry-run")
    assert snapshot(root) == before
    assert "would run: install -D -m 0644" in r.stdout       # it would fix the stale unit


def test_dry_run_on_the_real_system_changes_nothing():
    """Without --root, --dry-run only prints (useradd, chown, pip, systemctl included)."""
    watched = [Path(p) for p in ("/etc/edge-inspect", "/var/lib/edge-inspect", "/opt/edge-inspect",
                                 "/etc/systemd/system/edge-inspect.service")]
    before = {p: p.exists() for p in watched}
    r = install("--dry-run", "--udev")
    assert {p: p.exists() for p in watched} == before
    assert "would run: useradd" in r.stdout or "ok: user edge-inspect exists" in r.stdout
    assert "/opt/edge-inspect/venv/bin/pip install" in r.stdout
    assert not [l for l in r.stdout.splitlines() if l.startswith("+ ")]


def test_with_venv_installs_the_runtime_extra_only(tmp_path):
    """--with-venv under --root: the venv is made and pip gets '<repo>[runtime]'. A stub
    interpreter records the calls, so this needs no network."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python-stub"
    stub.write_text(f"""#!/usr/bin/env bash
echo "python $*" >> {log}
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\\necho "pip $*" >> {log}\\n' > "$3/bin/pip"
    printf '#!/usr/bin/env bash\\nexit 1\\n' > "$3/bin/python"   # tensorflow: not found
    chmod +x "$3/bin/pip" "$3/bin/python"
fi
""")
    stub.chmod(0o755)
    root = tmp_path / "root"
    install("--root", root, "--with-venv", "--python", stub)
    calls = log.read_text().splitlines()
    venv = root / "opt/edge-inspect/venv"
    assert calls[0] == f"python -m venv {venv}"
    pip = [c for c in calls if c.startswith("pip install")]
    assert pip == [f"pip install --disable-pip-version-check {ROOT}[runtime]"]
    # second run: the venv exists, only the package is upgraded
    install("--root", root, "--with-venv", "--python", stub)
    calls = log.read_text().splitlines()
    assert sum(c.startswith("python -m venv") for c in calls) == 1
    assert sum(c.startswith("pip install") for c in calls) == 2


def test_bad_usage(tmp_path):
    r = install("--frobnicate", check=False)
    assert r.returncode == 2 and "unknown option" in r.stderr
    r = install("--help", check=False)
    assert r.returncode == 0 and "--dry-run" in r.stdout
