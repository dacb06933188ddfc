"""agent/ is layered by role and imports run one way (docs/agent.md, "Layout"):

    agent.commands -> agent.report -> agent.runtime -> agent (the contract: config, bundle,
    preprocess, decide, types ...)

convert/ is a client of the contract and of the runtime's engines (it scores the int8 model through
the same engines the line runs), never of report/ or commands/; firmware_io/ knows nothing of
agent/ or convert/ but the contract's records it is handed; agent/ never imports convert/
(TensorFlow). Read from the source with ast, lazy imports inside functions included, so a
function-level import cannot hide an upward arrow.
"""
from __future__ import annotations

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "convert", "firmware_io")
RANK = {"agent": 0, "agent.runtime": 1, "agent.report": 2, "agent.commands": 3}
# which layers each non-agent package may use
ALLOWED_OUTSIDE = {
    "convert": {"agent", "agent.runtime", "convert", "firmware_io"},
    "firmware_io": {"firmware_io"},
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "agent":
        return parts[0]
    if len(parts) > 1 and parts[1] in ("runtime", "report", "commands"):
        return "agent." + parts[1]
    return "agent"


def imports(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    me = module_name(path, root)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from agent.runtime import engines` imports a module, not a name
            found.update(f"{target}.{a.name}" for a in node.names
                         if (root / (target.replace(".", "/") + f"/{a.name}")).exists()
                         or (root / (target.replace(".", "/") + f"/{a.name}.py")).exists())
    return {t for t in found if t.split(".")[0] in PACKAGES}


def edges(root: pathlib.Path) -> list[tuple[str, str]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if path.name == "__main__.py":       # `python -m agent` is the very top
                continue
            out.extend((module_name(path, root), target) for target in imports(path, root))
    return out


def test_the_three_rooms_exist():
    for room in ("runtime", "report", "commands"):
        assert (ROOT / "agent" / room / "__init__.py").is_file(), room
    # the contract convert/ shares stays at agent/'s top
    for contract in ("bundle", "preprocess", "decide", "config", "types"):
        assert (ROOT / "agent" / f"{contract}.py").is_file(), contract


def against_the_layering(root: pathlib.Path) -> list[str]:
    upward = []
    for source, target in edges(root):
        src, dst = layer(source), layer(target)
        if src in RANK and dst in RANK:
            if RANK[dst] > RANK[src]:
                upward.append(f"{source} -> {target}")
        elif src in RANK and dst == "convert":
            upward.append(f"{source} -> {target} (the agent never needs TensorFlow)")
        elif src in ALLOWED_OUTSIDE and dst not in ALLOWED_OUTSIDE[src]:
            upward.append(f"{source} -> {target}")
    return sorted(upward)


def test_imports_run_one_way():
    upward = against_the_layering(ROOT)
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_checker_sees_arrows_against_the_layering(tmp_path):
    """The rule must be able to fail: a lazy upward import, agent -> convert, convert -> report."""
    for pkg in ("agent", "agent/runtime", "agent/report", "convert", "firmware_io"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "agent/report/reporter.py").write_text("from agent.runtime import judge\n")
    (tmp_path / "agent/runtime/judge.py").write_text(
        "from . import parts\ndef f():\n    from agent.report.reporter import Reporter\n")
    (tmp_path / "agent/runtime/parts.py").write_text("import convert.fit\n")
    (tmp_path / "convert/fit.py").write_text("from agent.report import reporter\n")
    (tmp_path / "firmware_io/gate.py").write_text("from agent.bundle import Bundle\n")
    assert against_the_layering(tmp_path) == [
        "agent.runtime.judge -> agent.report.reporter",
        "agent.runtime.parts -> convert.fit (the agent never needs TensorFlow)",
        "convert.fit -> agent.report",
        "convert.fit -> agent.report.reporter",
        "firmware_io.gate -> agent.bundle",
    ]
