"""whale_dist: photo-identification of individual whales and dolphins at catalogue scale, on Ray.

The library imports nothing heavy at import time; jobs (``jobs/*.py``, ``whale-dist <command>``) are thin wrappers.
"""

__version__ = "0.1.0"
