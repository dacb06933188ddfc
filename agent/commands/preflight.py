"""What `run` will do with the model, done once without starting anything else.

check-config (and so the unit's ExecStartPre) must not say OK for a config whose bundle
`run` then refuses: a changed file, a `views` the bundle has no operating point for, an
input spec the model does not match. So it loads the bundle exactly as the daemon does
(Inspector.load: hashes, views, engine, smoke inference on the bundle's sample), on the
CPU: the model is the same file whatever the delegate, and an Edge TPU is a device,
which `check-config --no-devices` must not need and a running daemon may be holding.
"""

from __future__ import annotations

from agent.config import Config


def model_problems(cfg: Config) -> list[str]:
    """One line per reason `run` would refuse this config's model; [] when it would load."""
    # Imported here: the schema checks must work where the runtime (LiteRT, OpenCV) is not
    # installed, e.g. a workstation validating a plant's config.
    try:
        from agent.runtime.inspector import Inspector, InspectorError
    except ModuleNotFoundError as e:
        return [f"model.bundle: cannot load the model here: {e.name} is not installed "
                "(pip install 'edge-inspect[runtime]')"]
    m = cfg.model
    try:
        Inspector.load(m.bundle, delegate="cpu", threads=1, threshold=m.threshold,
                       views=m.views, workers=1, smoke_test=True)
    except InspectorError as e:
        return [f"model.bundle: {e}"]
    except ModuleNotFoundError as e:
        return [f"model.bundle: cannot load the model here: {e.name} is not installed "
                "(pip install 'edge-inspect[runtime]')"]
    return []


def describe_model(cfg: Config) -> str:
    """The summary line check-config prints for the model it loaded."""
    from agent.bundle import load_bundle

    b = load_bundle(cfg.model.bundle.resolve(), verify=False).with_views(cfg.model.views)
    threshold = b.threshold if cfg.model.threshold is None else cfg.model.threshold
    return (f"bundle    {b.name or b.path.name}: {b.input.width}x{b.input.height} "
            f"{b.input.color}, {b.input.views} view(s), threshold {threshold:g}, "
            f"sha256 {b.model_sha256[:12]}")
