"""`mixofshow studio`: a local web page to draw a regional layout, check it, sample it and download both.

The server (`server.py`, standard library only) holds one loaded pipeline; the page (`static/`) is plain
HTML/JS/canvas served from the package, nothing fetched from the internet.
"""

from .server import Job, Studio, StudioServer, make_server

__all__ = ["Job", "Studio", "StudioServer", "make_server"]
