"""Test-only launcher: the sink role whose ClickHouse inserts fail while a flag file exists.

Should only be used for testing: `python -m tests.support.outage_sink_worker worker`
with `VS_TEST_OUTAGE_FLAG=/path/to/flag`. It builds the real app and the real sink,
injecting a client wrapper through the sink's `client_factory` seam.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from processors.analytics.client import open_client
from streams.app import create_app
from streams.runtime import build_sink
from streams.settings import Settings


class OutageClient:
    """Delegates to a real client; `insert` raises while the flag file exists."""

    def __init__(self, inner: Any, flag: Path) -> None:
        self._inner = inner
        self._flag = flag

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        if self._flag.exists():
            raise ConnectionError("simulated ClickHouse outage")
        return self._inner.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> None:
    settings = Settings.from_env(os.environ)
    flag = Path(os.environ["VS_TEST_OUTAGE_FLAG"])
    sink = build_sink(settings, client_factory=lambda dsn: OutageClient(open_client(dsn), flag))
    create_app(settings, sink=sink).main()


if __name__ == "__main__":
    main()
