"""The operator page (issue 18): live view, health, counters, the last rejects with where
the defect is, and a review queue whose marks export as a training folder.

    state.py    the pipeline sink that keeps what the page shows
    overlay.py  JPEGs and the defect map drawn over an image
    review.py   the review queue and its marks beside the recorder's images
    auth.py     the token
    server.py   the HTTP server (standard library) and its endpoints
    static/     the page: plain HTML, CSS and a little JavaScript, nothing fetched from outside
"""

from __future__ import annotations

from agent.report.ui.state import UiState

__all__ = ["UiState", "build_server"]


def build_server(agent, state: UiState):
    """The server for agent.cfg.ui, not yet started. Raises OSError (port taken) or
    ValueError (token file empty)."""
    from agent.report.ui.auth import read_token
    from agent.report.ui.review import ReviewStore
    from agent.report.ui.server import UiApp, UiServer

    ui = agent.cfg.ui
    insp = agent.inspector
    reviews = None
    if agent.cfg.recorder.enabled:
        defects = list(insp.bundle.defect_labels) if insp is not None else ["defect"]
        reviews = ReviewStore(agent.cfg.recorder.dir, defects)
    app = UiApp(agent=agent, state=state, reviews=reviews, token=read_token(ui.token_file),
                control=ui.control, live_fps=ui.live_fps, loopback=ui.loopback)
    return UiServer(app, ui.bind, ui.port)
