"""The gateway's HTTP server (uvicorn) on a thread of its own, started and stopped from the
launcher's thread."""

from __future__ import annotations

import threading
import time

import uvicorn

from disagg.gateway import Gateway


class GatewayServer:
    def __init__(self, gateway: Gateway, host: str, port: int):
        self.gateway, self.host, self.port = gateway, host, port
        config = uvicorn.Config(gateway.app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="disagg-gateway",
                                        daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve; returns once the gateway accepts connections (RuntimeError otherwise)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway failed to start on {self.host}:{self.port}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
