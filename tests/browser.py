"""Browser-test helpers: headless Debian Chromium driven by Playwright, a live loopback server.

Pytest-free so that any test module can import it: ``chromium_or_skip()`` skips when the
browser is missing, ``launch(playwright)`` starts it with flags that keep it off the network,
``live_studio(app)`` serves an ASGI app with uvicorn in a thread and yields its base URL.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    """The Chromium executable; skips the calling test (or module) when it or Playwright is
    missing."""
    import pytest

    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium")
    return CHROMIUM


def launch(playwright):
    """A headless Chromium browser from ``playwright`` (a started ``sync_playwright()``)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)


@contextmanager
def live_studio(app) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields ``http://127.0.0.1:PORT``."""
    import uvicorn

    from tuneforge.serve.cli import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError("the studio server did not start")
        yield url
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
