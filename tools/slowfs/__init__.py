"""slowfs: a passthrough FUSE filesystem that makes every metadata operation cost a network round trip.

Stands in for the shared network volume in benchmarks. See README.md here, `python -m tools.slowfs --help`,
and `mounted` for use from Python.
"""

from .mount import DEFAULT_DELAY_MS, Mount, is_mounted, mounted, unmount

__all__ = ["DEFAULT_DELAY_MS", "Mount", "is_mounted", "mounted", "unmount"]
