"""gradflow's version and the versions of what computes its results, recorded beside every saved result."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("gradflow")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

RECORDED_PACKAGES = ("jax", "diffrax", "equinox", "optax")


def versions() -> dict[str, str]:
    """{"gradflow": ..., "jax": ..., "diffrax": ..., "equinox": ..., "optax": ...}, read from the installed metadata."""
    out = {"gradflow": __version__}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
