"""The private APIs of dependencies that gradflow needs because no public one exists, each held once.

Every name here reads a private attribute of equinox or diffrax; tests/test_dependencies.py fails
as soon as a release moves one, so a dependency upgrade breaks a test, not a result.
"""

from __future__ import annotations

import contextlib

import diffrax
import jax.numpy as jnp
from equinox import _errors as equinox_errors  # private: the runtime switch behind EQX_ON_ERROR


def result_code(result) -> jnp.ndarray:
    """The integer index of a ``diffrax.RESULTS`` item (stored in a Solution; no public accessor exists)."""
    return jnp.asarray(result._value)


def result_message(code: int) -> str:
    """The message diffrax attaches to result index ``code`` (first line), or "result code N" when it has none."""
    messages = diffrax.RESULTS._index_to_message  # a list indexed by result code
    message = messages[int(code)] if 0 <= int(code) < len(messages) else None
    return str(message).strip().splitlines()[0] if message else f"result code {int(code)}"


def is_result(code, item) -> bool:
    """Whether the stored index ``code`` is the ``diffrax.RESULTS`` item ``item``.

    Args:
        code (int | jax.Array): a stored result index (e.g. a solution's ``result`` saved as an int).
        item (diffrax.RESULTS): the result item to compare with, e.g. ``diffrax.RESULTS.successful``.

    Returns:
        True when they are the same result.
    """
    return int(code) == int(item._value)


@contextlib.contextmanager
def runtime_checks_as_nan():
    """Trace with equinox's runtime checks as NaN-returning selects instead of host callbacks.

    diffrax checks ``SaveAt(ts=...)`` with ``eqx.error_if``, which lowers to a Python callback; JAX
    never writes an executable holding a callback to its persistent cache.  equinox reads its
    ``EQX_ON_ERROR`` environment variable only at import, so the switch is flipped at trace time.
    """
    old = equinox_errors.EQX_ON_ERROR
    equinox_errors.EQX_ON_ERROR = "nan"
    try:
        yield
    finally:
        equinox_errors.EQX_ON_ERROR = old
