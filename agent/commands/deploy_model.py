"""edge-inspect deploy-model BUNDLE: verify a model bundle, copy it next to the others and
switch the agent to it atomically; --rollback switches back.

    models-dir/
      line1-defects-3f2a9c0d1e2b/     one directory per deployed bundle: <name>-<sha12>
      line1-defects-77aa01c4b9e0/
      current  -> line1-defects-77aa01c4b9e0    what the agent loads ([model] bundle)
      previous -> line1-defects-3f2a9c0d1e2b    what --rollback goes back to

A bundle is deployed only after its hashes verify, its input spec parses, the model loads
on the CPU engine with the bundle's input shape and label count, and a smoke inference on
the bundle's sample image gives finite probabilities. The copy is verified again before
`current` moves. `current` is switched with rename(2) over the old link, so the agent sees
either the old or the new bundle, never a half-copied one. Then the agent is told to reload
(systemctl reload, or SIGHUP to a pid). The agent itself keeps the old model if the new one
fails to load.

Exit codes: 0 deployed (or already current), 2 refused (nothing switched; the reason is
printed), 1 switched but the reload failed (the agent loads it at its next start/reload).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from agent.bundle import Bundle, BundleError, load_bundle

DEFAULT_MODELS_DIR = Path("/var/lib/edge-inspect/models")
CURRENT = "current"
PREVIOUS = "previous"


class DeployError(Exception):
    """The bundle must not become current; the message says why."""


def _say(msg: str) -> None:
    print(f"deploy-model: {msg}", flush=True)


# -- verification ------------------------------------------------------------------------

def smoke_test(b: Bundle) -> str:
    """Run the bundle's model once on the CPU on its sample image. Returns a one-line
    result; raises DeployError when the model cannot run or gives no probabilities."""
    import numpy as np

    from agent.runtime.engines import EngineError, create_engine
    from agent.preprocess import preprocess

    try:
        if b.kind == "anomaly":
            from agent.runtime.anomaly import AnomalyEngine
            engine = AnomalyEngine.from_bundle(b)
        else:
            engine = create_engine("cpu", b.model_path, b.input, len(b.labels))
    except EngineError as e:
        raise DeployError(f"the model does not load: {e}") from None
    if b.sample:
        import cv2

        sample = b.path / b.sample
        image = cv2.imread(str(sample), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise DeployError(f"sample image {sample} cannot be read as an image")
        what = f"sample {b.sample}"
    else:
        # No stored sample: a mid-grey frame still proves the model runs end to end.
        _say("warning: the bundle has no sample image; smoke-testing on a grey frame")
        image = np.full((b.input.height, b.input.width, max(b.input.channels, 1)), 128, np.uint8)
        what = "a grey frame"
    try:
        y = np.asarray(engine.invoke(preprocess(image, b.input)), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - anything the runtime raises refuses the bundle
        raise DeployError(f"smoke inference on {what} failed: {type(e).__name__}: {e}") from None
    if y.ndim != 2 or y.shape[1] != len(b.labels):
        raise DeployError(f"smoke inference gave shape {y.shape}, expected (tiles, {len(b.labels)})")
    if not np.all(np.isfinite(y)):
        raise DeployError(f"smoke inference gave non-finite outputs {y.tolist()}")
    tol = 1e-3
    if y.min() < -tol or y.max() > 1 + tol:
        raise DeployError(f"smoke inference outputs {y.round(4).tolist()} are not probabilities "
                          "(outside [0, 1]): was the model exported with a softmax/sigmoid head?")
    sums = y.sum(axis=1)
    if np.any(np.abs(sums - 1) > 0.1):
        _say(f"warning: outputs sum to {sums.round(3).tolist()}, not 1 (independent sigmoids?)")
    top = int(y[0].argmax())
    return f"smoke test on {what}: {b.labels[top]} {y[0, top]:.3f}"


def verify(path: Path) -> tuple[Bundle, str]:
    """Everything short of deploying. Raises DeployError."""
    try:
        b = load_bundle(path, verify=True)
    except BundleError as e:
        raise DeployError(str(e)) from None
    return b, smoke_test(b)


# -- the models directory ----------------------------------------------------------------

def deployed_name(b: Bundle) -> str:
    """<name>-<sha12 of bundle.json>: bundle.json lists every file's sha256, so its hash
    names the whole bundle. A re-tuned threshold beside an unchanged model.tflite is a new
    bundle with a directory of its own, so switching to it keeps the old one to roll back to."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", b.name or b.path.name).strip(".-") or "bundle"
    return f"{name[:64]}-{b.manifest_sha256[:12]}"


def _link_target(link: Path) -> str | None:
    """The directory name a models-dir link points to, None when absent."""
    if link.is_symlink():
        return os.path.basename(os.readlink(link).rstrip("/"))
    if link.exists():
        raise DeployError(f"{link} exists but is not a symlink; move it aside (it is not "
                          "managed by deploy-model) and deploy again")
    return None


def _point(link: Path, target: str) -> None:
    """Make `link` point at `target` (a name in the same directory) atomically: a new
    symlink under a temporary name, then rename(2) over the old one."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(models_dir: Path):
    """One deploy at a time per models directory."""
    with open(models_dir / ".deploy.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("another deploy-model is running on this models directory; waiting")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _match_owner(path: Path, models_dir: Path) -> None:
    """Run as root for a models dir owned by the service user: hand the copy to that user."""
    if os.geteuid() != 0:
        return
    st = models_dir.stat()
    if st.st_uid == 0 and st.st_gid == 0:
        return
    for p in [path, *path.rglob("*")]:
        os.lchown(p, st.st_uid, st.st_gid)


def install_copy(b: Bundle, models_dir: Path) -> tuple[Path, bool]:
    """Copy the bundle to models_dir/<name>-<sha12>/ and verify the copy. Returns the
    directory and whether it was copied now (False: an identical one was already there)."""
    dest = models_dir / deployed_name(b)
    if dest.exists():
        try:
            existing = load_bundle(dest, verify=True)
            if existing.manifest_sha256 == b.manifest_sha256:
                return dest, False
            # only a hand-edited copy gets here (the name is the manifest's hash)
            _say(f"{dest.name} exists with a different bundle.json; replacing it")
        except BundleError as e:
            _say(f"{dest.name} exists but is damaged ({e}); replacing it")
    tmp = models_dir / f".incoming-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(b.path, tmp, symlinks=False)
        try:
            load_bundle(tmp, verify=True)
        except BundleError as e:
            raise DeployError(f"the copy in {models_dir} does not verify (disk full or "
                              f"failing?): {e}") from None
        _match_owner(tmp, models_dir)
        if dest.exists():
            old = models_dir / f".old-{dest.name}-{os.getpid()}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(models_dir)
    return dest, True


def switch(models_dir: Path, target: str) -> str | None:
    """current -> target, previous -> the old current. Returns the old current's name."""
    current, previous = models_dir / CURRENT, models_dir / PREVIOUS
    old = _link_target(current)
    _link_target(previous)  # refuses a non-symlink 'previous' before anything moves
    if old == target:
        return old
    _point(current, target)
    if old is not None:
        _point(previous, old)
    _fsync_dir(models_dir)
    return old


# -- telling the agent -------------------------------------------------------------------

def reload_agent(args) -> int:
    if args.no_reload:
        _say("not reloading (--no-reload): the agent loads the new model at its next reload "
             "or start")
        return 0
    if args.pid_file:
        try:
            pid = int(Path(args.pid_file).read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as e:
            _say(f"error: cannot signal the agent from pid file {args.pid_file}: {e}")
            return 1
        _say(f"sent SIGHUP to pid {pid}: the agent reloads (it keeps the old model if the new "
             "one fails to load; check its log)")
        return 0
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        _say("systemctl not found: reload the agent yourself (kill -HUP <its pid>, or "
             "--pid-file); it loads the new model at its next start anyway")
        return 0
    unit = args.service
    active = subprocess.run([systemctl, "is-active", "--quiet", unit]).returncode == 0
    if not active:
        _say(f"{unit} is not running: it loads the new model when it starts "
             f"(systemctl start {unit})")
        return 0
    r = subprocess.run([systemctl, "reload", unit], capture_output=True, text=True)
    if r.returncode != 0:
        _say(f"error: systemctl reload {unit} failed: {(r.stderr or r.stdout).strip()}")
        return 1
    _say(f"reloaded {unit} (journalctl -u {unit} -n 20 shows whether the model loaded)")
    return 0


# -- the command -----------------------------------------------------------------------------

def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Verify a model bundle and switch the "
                                "agent to it atomically (or --rollback to the previous one).")
    p.add_argument("bundle", nargs="?", type=Path, help="the bundle directory (from 'edge-inspect train')")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                   help=f"where deployed bundles live (default {DEFAULT_MODELS_DIR}); the agent's "
                        "[model] bundle should be MODELS_DIR/current")
    p.add_argument("--rollback", action="store_true", help="switch back to the previous bundle")
    p.add_argument("--no-reload", action="store_true", help="switch, but do not tell the agent")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--service", default="edge-inspect",
                     help="systemd unit to reload (default edge-inspect)")
    who.add_argument("--pid-file", help="send SIGHUP to the pid in this file instead of systemctl")
    p.add_argument("--check", action="store_true",
                   help="only verify BUNDLE (hashes, file names, the model loads and runs as "
                        "'run' would); switch nothing. Exit 0 verified, 2 refused, 1 error")
    return p


def check(bundle: Path) -> int:
    """--check: verify only, one line. 0 verified, 2 refused, 1 the check itself failed."""
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            b, smoke = verify(bundle.resolve())
    except DeployError as e:
        _say(f"refused: {bundle}: {e}")
        return 2
    except Exception as e:  # noqa: BLE001 - the runtime itself failed: not the bundle's verdict
        _say(f"error: cannot check {bundle}: {type(e).__name__}: {e}")
        return 1
    warn = "; ".join(line.split("deploy-model: ", 1)[-1] for line in out.getvalue().splitlines()
                     if line.strip())
    _say(f"ok: {bundle} verifies: {len(b.files)} file(s) match bundle.json, input "
         f"{b.input.width}x{b.input.height}x{b.input.channels} {b.input.color}, labels "
         f"{b.labels}; {smoke}" + (f" ({warn})" if warn else "") + "; nothing switched")
    return 0


def _rollback(models_dir: Path) -> str:
    current = _link_target(models_dir / CURRENT)
    previous = _link_target(models_dir / PREVIOUS)
    if previous is None:
        raise DeployError(f"no previous bundle in {models_dir} to roll back to")
    try:
        _, smoke = verify(models_dir / previous)
    except DeployError as e:
        raise DeployError(f"the previous bundle {previous} no longer verifies: {e}") from None
    _point(models_dir / CURRENT, previous)
    if current is not None:
        _point(models_dir / PREVIOUS, current)
    _fsync_dir(models_dir)
    return f"rolled back: current -> {previous} (was {current}); {smoke}"


def main(argv: list[str]) -> int:
    p = _parser(argv[0] if argv else "edge-inspect deploy-model")
    args = p.parse_args(argv[1:])
    if args.check:
        if args.bundle is None or args.rollback:
            p.error("--check needs a BUNDLE (and no --rollback)")
        return check(args.bundle)
    if args.rollback == (args.bundle is not None):
        p.error("give a BUNDLE to deploy, or --rollback (not both)")
    models_dir: Path = args.models_dir
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _say(f"refused: cannot create {models_dir}: {e.strerror}")
        return 2
    if not os.access(models_dir, os.W_OK):
        _say(f"refused: {models_dir} is not writable by this user (run with sudo, or as the "
             "service user)")
        return 2

    try:
        with _locked(models_dir):
            if args.rollback:
                _say(_rollback(models_dir))
            else:
                src = args.bundle.resolve()
                if src.parent == models_dir.resolve() and src.name in (CURRENT, PREVIOUS):
                    raise DeployError(f"{args.bundle} is the models directory's own link; "
                                      "give the bundle's directory")
                b, smoke = verify(src)
                _say(f"verified {src}: {len(b.files)} file(s) match bundle.json, input "
                     f"{b.input.width}x{b.input.height}x{b.input.channels} {b.input.color}, "
                     f"labels {b.labels}; {smoke}")
                dest, copied = install_copy(b, models_dir)
                _say(f"{'copied to' if copied else 'already present:'} {dest} (copy verified)")
                old = switch(models_dir, dest.name)
                if old == dest.name:
                    _say(f"{dest.name} is already current; nothing to switch")
                    return 0
                _say(f"current -> {dest.name}" + (f" (previous -> {old})" if old else ""))
    except DeployError as e:
        _say(f"refused: {e}")
        _say(f"current is unchanged: {_describe_current(models_dir)}")
        return 2
    except OSError as e:
        _say(f"refused: {e}")
        return 2
    return reload_agent(args)


def _describe_current(models_dir: Path) -> str:
    try:
        return _link_target(models_dir / CURRENT) or "(none yet)"
    except DeployError:
        return "(not a symlink)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
