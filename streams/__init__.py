"""visionstream's Faust app, agents, codecs, settings and CLI (`python -m streams`)."""

__version__ = "0.1.0"
