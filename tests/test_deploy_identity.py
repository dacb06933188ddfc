"""Issue 20 items 9 and 10, with the real demo bundle (agent/demo_data/bundle):
file names in bundle.json are confined to the bundle; a changed bundle.json is a new
deployment with a rollback target, even when model.tflite is unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from agent.commands import deploy_model as deploy
from agent.bundle import BundleError, load_bundle, sha256_file

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data" / "bundle"


def run(*args) -> int:
    return deploy.main(["edge-inspect deploy-model", *map(str, args), "--no-reload"])


def link(models: Path, name: str) -> str | None:
    p = models / name
    return os.readlink(p) if p.is_symlink() else None


def demo_copy(dst: Path) -> Path:
    shutil.copytree(DEMO, dst)
    return dst


def edit_manifest(bundle: Path, fn) -> None:
    m = json.loads((bundle / "bundle.json").read_text())
    fn(m)
    (bundle / "bundle.json").write_text(json.dumps(m, indent=2))


def list_file(name: str, real: Path):
    """Name `name` in files with the correct hash of `real` (what the attack needs)."""
    def fn(m):
        m["files"][name] = {"sha256": sha256_file(real), "bytes": real.stat().st_size}
    return fn


# -- item 9: names confined to the bundle --------------------------------------------------

@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_out", "sample_outside"])
def test_file_names_outside_the_bundle_are_refused(tmp_path, capsys, kind):
    models = tmp_path / "models"
    assert run(DEMO, "--models-dir", models) == 0
    before = (sorted(p.name for p in models.iterdir()), link(models, "current"))
    bad = demo_copy(tmp_path / "bad")
    target = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")
    if kind == "absolute":
        edit_manifest(bad, list_file(str(target), target))
    elif kind == "dotdot":
        up = "../" * (len(bad.resolve().parts) + 4) + str(target).lstrip("/")
        edit_manifest(bad, list_file(up, target))
    elif kind == "symlink_out":
        (bad / "notes.txt").symlink_to(target)
        edit_manifest(bad, list_file("notes.txt", target))
    else:
        edit_manifest(bad, lambda m: m.update(sample=str(target)))
    with pytest.raises(BundleError, match="inside its own directory"):
        load_bundle(bad)
    capsys.readouterr()
    assert run(bad, "--models-dir", models) == 2
    out = capsys.readouterr().out
    refusal = [ln for ln in out.splitlines() if "refused" in ln]
    assert len(refusal) == 1 and "may only name files inside its own directory" in refusal[0], out
    assert "current is unchanged" in out
    assert (sorted(p.name for p in models.iterdir()), link(models, "current")) == before
    assert not any(p.name.startswith(".incoming") for p in models.iterdir())


def test_subdirectory_names_inside_the_bundle_still_load(tmp_path):
    b = demo_copy(tmp_path / "b")
    (b / "extra").mkdir()
    shutil.copy(b / "sample.png", b / "extra" / "ref.png")
    edit_manifest(b, list_file("extra/ref.png", b / "extra" / "ref.png"))
    assert "extra/ref.png" in load_bundle(b).files


# -- item 10: bundle.json is part of the identity ------------------------------------------

def test_changed_bundle_json_with_same_model_is_deployed_and_can_be_rolled_back(tmp_path,
                                                                                 capsys):
    models = tmp_path / "models"
    assert run(DEMO, "--models-dir", models) == 0
    first = link(models, "current")
    # a re-tuned threshold: same model.tflite, a different bundle.json
    tuned = demo_copy(tmp_path / "tuned")
    edit_manifest(tuned, lambda m: m.update(threshold=0.25))
    capsys.readouterr()
    assert run(tuned, "--models-dir", models) == 0
    out = capsys.readouterr().out
    assert "nothing to switch" not in out, out
    assert load_bundle(models / "current").threshold == 0.25          # live
    second = link(models, "current")
    assert second != first and link(models, "previous") == first
    assert load_bundle(models / first).threshold == DEMO_THRESHOLD   # untouched, not replaced
    # the same again: nothing to do
    capsys.readouterr()
    assert run(tuned, "--models-dir", models) == 0
    assert "already current" in capsys.readouterr().out
    # rollback goes back to the original threshold, and forward again
    assert run("--rollback", "--models-dir", models) == 0
    assert load_bundle(models / "current").threshold == DEMO_THRESHOLD
    assert (link(models, "current"), link(models, "previous")) == (first, second)


def test_changed_file_list_keeps_previous(tmp_path):
    models = tmp_path / "models"
    assert run(DEMO, "--models-dir", models) == 0
    first = link(models, "current")
    # the same model, one file fewer (no float model): the old current must stay intact
    slim = demo_copy(tmp_path / "slim")
    (slim / "model_float.tflite").unlink()
    edit_manifest(slim, lambda m: m["files"].pop("model_float.tflite"))
    assert run(slim, "--models-dir", models) == 0
    assert link(models, "previous") == first and link(models, "current") != first
    assert "model_float.tflite" in load_bundle(models / first).files      # verifies, complete
    assert "model_float.tflite" not in load_bundle(models / "current").files
    assert run("--rollback", "--models-dir", models) == 0
    assert link(models, "current") == first


DEMO_THRESHOLD = json.loads((DEMO / "bundle.json").read_text())["threshold"]
