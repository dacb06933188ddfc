"""Small helpers shared by tests (not fixtures)."""

import threading
import time


def wait_until(pred, timeout: float = 5.0, step: float = 0.005) -> bool:
    """Poll pred() until it is truthy or timeout passes; returns its last truth value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def run_agent(agent) -> threading.Thread:
    """Start an agent.commands.daemon.Agent and run its supervisor loop in a daemon thread."""
    agent.start()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t
