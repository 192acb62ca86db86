"""The package's version, read from its installed metadata: pyproject.toml is the one place it is written."""
import importlib.metadata

try:
    __version__ = importlib.metadata.version("moderncnn")
except importlib.metadata.PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"
