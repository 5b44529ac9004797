"""Test-only launcher: the inference worker in slot mode on an out-of-order engine.

Should only be used for testing: `python -m tests.support.slot_worker worker` with the
worker's usual settings (`VS_ENGINE_MODE=slot`, `VS_REPLAY_OUTPUTS` for the answers). It
builds the real app and runtime, injecting `OutOfOrderEngine` (tests/support/
streaming_engine.py): within every 8 consecutive requests the later ones finish first,
and every 40th request (`req-00005`, `req-00045`, ...) takes 8 s, so many later inputs
of its partition finish while it is pending.
"""

from __future__ import annotations

import os
from typing import Any

from streams.app import create_app
from streams.runtime import load_replay_outputs
from streams.settings import Settings
from tests.support.streaming_engine import OutOfOrderEngine, reversed_delays

SLOW_S = 8.0


def delays(request: Any) -> float:
    if int(request.request_id.rsplit("-", 1)[-1]) % 40 == 5:
        return SLOW_S
    return fast(request)


fast = reversed_delays(0.01, 0.03, 8)


def main() -> None:
    settings = Settings.from_env(os.environ)
    assert settings.replay_outputs is not None
    engine = OutOfOrderEngine(
        load_replay_outputs(settings.replay_outputs),
        delays,
        slots=16,
        queue_size=settings.slot_queue_size,
    )
    create_app(settings, engine=engine).main()


if __name__ == "__main__":
    main()
