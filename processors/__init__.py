"""Pure compute for visionstream.

Gathering, tiling, prompts, inference, decisions, categorization and the analytics
sink. Nothing in this package imports faust or reads the environment: every function
takes its inputs and configuration explicitly, so each phase is testable without
Kafka or a GPU.
"""
