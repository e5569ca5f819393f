"""The floor of the house: settings read from the environment, and the platform's version.

Every other package may import ``core``; ``core`` imports nothing of the platform's own
(see docs/architecture.md).
"""

__version__ = "0.1.0"
