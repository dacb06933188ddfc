"""The `edge-inspect` command. Each subcommand lives in its own module, imported only when
called, so `edge-inspect run` never loads TensorFlow (only train/evaluate do)."""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("agent.commands.run:main", "run the inspection daemon (--config FILE)"),
    "demo": ("agent.commands.demo:main", "the whole loop on built-in defaults: no hardware, no setup"),
    "check-config": ("agent.commands.check_config:main", "validate a config file and summarise it"),
    "train": ("convert.train:main", "train a defect classifier and export an int8 bundle"),
    "evaluate": ("convert.evaluate:main", "measure a bundle on a labelled image folder"),
    "convert-bundle": ("convert.onnx_export:main",
                       "add model.onnx (float, int8 QDQ) to a bundle for ONNX Runtime / TensorRT"),
    "bench": ("agent.commands.bench:main", "will this model keep up with my line on this box?"),
    "gate-sim": ("firmware_io.gate_sim_cli:main", "a simulated reject-gate controller on a serial port"),
    "deploy-model": ("agent.commands.deploy_model:main", "verify a bundle and switch to it atomically"),
    "show": ("agent.commands.show:main", "a bundle's operating points, per-views table and provenance"),
    "export-labels": ("agent.commands.export_labels:main",
                      "reviewed images from the operator page as a training folder"),
    "simulate-line": ("agent.commands.simulate_line:main",
                      "a simulated conveyor video with its ground truth (parts, line and gate times)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-inspect",
        description="Visual defect inspection for factory edge boxes.",
        epilog="Run 'edge-inspect COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"edge-inspect {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name.startswith("tensorflow") or e.name.startswith("keras")):
            print(f"edge-inspect {argv[0]}: needs TensorFlow, which the edge-box install leaves "
                  "out; on a workstation: pip install 'edge-inspect[train]'", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, func)([f"edge-inspect {argv[0]}", *argv[1:]]) or 0)


if __name__ == "__main__":
    sys.exit(main())
