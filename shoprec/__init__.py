"""shoprec: the command line and operations (runs, backfills, services, demo).

The top floor of the house (docs/architecture.md): it may import every library package;
none of them imports it.
"""

from core import __version__

__all__ = ["__version__"]
