"""The review loop's way back: decisions on a night's proposals (``job``: ``whale-dist review``) become catalogue
versions, and the catalogue's new photos reach the index (``refresh``). Orchestration over embed and index; importing
the package imports nothing heavy.
"""
