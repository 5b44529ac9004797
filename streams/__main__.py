"""`python -m streams <command>`: the Faust app's own CLI (worker, plus our commands)."""

from __future__ import annotations

import os
import sys

from streams.logs import configure_logging
from streams.settings import Settings, SettingsError


def main() -> None:
    """Build the settings from the environment and run the app's CLI.

    Exits with a message naming the setting when the environment is invalid.
    """
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"visionstream: bad setting: {exc}")
    configure_logging(settings.log_format)
    # Imported here: building the app imports faust, which the settings check should not need.
    from streams.app import create_app

    create_app(settings).main()


if __name__ == "__main__":
    main()
