"""The one base class for errors that are the user's to fix, and what the CLI treats as one.

A bad config key, an unreadable catalogue, a photo that is not an image, an index whose files do not match its
manifest: each is a ``UserError``. ``whale-dist`` (``cli.run_job``) prints such an error as one line and exits with
status 2, never a traceback; anything else is a bug or an outage and keeps its traceback. ``FileNotFoundError`` is
counted too: a missing input URL is the user's to fix, and fsspec and pyarrow raise it as that type.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad config, bad input or an integrity failure: reported in one line, exit status 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
