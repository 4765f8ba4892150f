"""uvicorn in a background thread on a loopback port: what the tests and the load benchmark serve with."""

from __future__ import annotations

import threading
import time

import uvicorn


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``; port 0 picks a free one."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.host = host
        self.timeout = timeout
        self.port: int | None = None
        self._thread = threading.Thread(target=self.server.run, name="dylora-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host} within {self.timeout:.0f}s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(self.timeout)
