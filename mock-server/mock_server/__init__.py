"""Mock source API: serves customers, machines and readings JSON files, page by page."""

from mock_server.app import create_app
from mock_server.data import StartupError

__all__ = ["StartupError", "create_app"]
