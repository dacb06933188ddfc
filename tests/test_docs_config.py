"""The docs say only what check-config accepts (issue 21): every ```toml snippet in README.md
and docs/*.md, config.example.toml, and every inline `key = value` a doc names."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from agent.commands.check_config import main as check_main
from agent.config import Config, parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO = ROOT / "agent" / "demo_data"


def toml_snippets() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for i, m in enumerate(re.finditer(r"```toml\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.relative_to(ROOT)}#{i + 1}", m.group(1)))
    return out


def inline_settings() -> list[tuple[str, str | None, str, str]]:
    """(doc, section or None, key, value) for `[sec] key = v`, `sec.key = v`, `key = v`."""
    pat = re.compile(r"`(?:\[([a-z_]+)\] |([a-z_]+)\.)?([a-z_]+) = ([^`]+)`")
    out = []
    for doc in DOCS:
        for m in pat.finditer(doc.read_text()):
            out.append((doc.name, m.group(1) or m.group(2), m.group(3), m.group(4)))
    return out


def test_the_docs_have_snippets_to_check():
    assert len(toml_snippets()) >= 3 and len(inline_settings()) >= 10


@pytest.mark.parametrize("where, snippet", toml_snippets(), ids=[w for w, _ in toml_snippets()])
def test_toml_snippet_passes_check_config(where, snippet, tmp_path, capsys):
    raw = tomllib.loads(snippet)
    # what a snippet leaves out, a box has: a bundle, a camera, writable state
    shutil.copytree(DEMO / "bundle", tmp_path / "bundle")
    base = {"camera": {"source": str(DEMO / "images")}, "model": {"bundle": "bundle"},
            "metrics": {"port": 0}, "recorder": {"dir": "rec"}, "mqtt": {"outbox": "ob.sqlite"}}
    for section, keys in base.items():
        raw.setdefault(section, {})
        for k, v in keys.items():
            raw[section].setdefault(k, v)
    lines = []
    for section, keys in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(lines) + "\n")
    code = check_main(["check-config", "--no-devices", str(cfg)])
    assert code == 0, f"{where}:\n{snippet}\n{capsys.readouterr().err}"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def test_example_config_schema_accepts_every_key():
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    cfg = parse_config(raw, ROOT)
    assert cfg.gate.kind == "serial"


def _unions() -> dict:
    """Sections that are unions of one model per kind: {section: (tag key, {tag: model})}."""
    from agent.trigger_config import TRIGGER_MODES
    from firmware_io.gates import GATE_KINDS
    return {"trigger": ("mode", TRIGGER_MODES), "gate": ("kind", GATE_KINDS)}


def _keys(name, f) -> set[str]:
    # a union's keys are all its models' keys
    if name in _unions():
        return {k for m in _unions()[name][1].values() for k in m.model_fields}
    return set(f.annotation.model_fields)


@pytest.mark.parametrize("doc, section, key, value", inline_settings(),
                         ids=[f"{d}:{s or ''}.{k}" for d, s, k, _ in inline_settings()])
def test_inline_setting_names_a_real_key(doc, section, key, value):
    sections = Config.model_fields
    if section is None:
        owners = [s for s, f in sections.items() if key in _keys(s, f)]
        assert owners, f"{doc}: `{key} = {value}` is no config key"
        return
    assert section in sections, f"{doc}: [{section}] is no config section"
    model = sections[section].annotation
    assert key in _keys(section, sections[section]), f"{doc}: [{section}] has no key {key!r}"
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return          # a placeholder such as `workers = N`
    if section in _unions():        # validate against the first model that owns the key
        tag, models = _unions()[section]
        if key == tag:
            assert parsed in models, f"{doc}: `[{section}] {tag} = {value}`"
        elif section == "gate":
            # a lone key: the rules across the gate's keys (a port, a delay) are not its own
            from firmware_io.checked import DEFER_CHECKS
            owner = next(m for m in models.values() if key in m.model_fields)
            owner.model_validate({key: parsed}, context=DEFER_CHECKS)
        else:
            next(m for m in models.values() if key in m.model_fields).model_validate({key: parsed})
        return
    model.model_validate({key: parsed})
