"""HTML pages from the Jinja2 templates in ``whale_dist/templates`` (package data), always with autoescape on.

Every page shows strings from user data (file names, ids, species, error messages): with autoescape a value reaches
the page escaped unless a template marks it otherwise, so a forgotten ``esc()`` can no longer inject markup. Jinja2
is imported when a page is rendered, not when this module is.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def environment():
    """One environment per process: templates are compiled once; undefined names are errors, not empty strings."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("whale_dist", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              finalize=_escape)


def _escape(value):
    """Every printed value escaped the way ``html.escape(quote=True)`` does (``'`` as ``&#x27;``, as pages did before
    templates) and ``None`` printed as nothing; markup a template built itself (macros) passes unchanged."""
    import html

    from markupsafe import Markup

    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def render(name: str, **context) -> str:
    """The template ``name`` rendered with ``context``."""
    return environment().get_template(name).render(**context)
