"""The private APIs of dependencies that gradflow needs because no public one exists, each held once.

Every name here reads (or, for the two result constants, restates) a private attribute of equinox or diffrax;
tests/test_dependencies.py fails as soon as a release moves one, so a dependency upgrade breaks a test, not a result.
"""

from __future__ import annotations

import contextlib

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from equinox import _errors as equinox_errors  # private: the runtime switch behind EQX_ON_ERROR

from gradflow._imports import diffrax  # a stand-in: diffrax is imported when first read

SUCCESSFUL = 0  # the index of diffrax.RESULTS.successful, read without importing diffrax (a warm process never does)
RESULT_DTYPE = np.dtype(np.int32)  # the dtype of a stored result index (tests/test_dependencies.py checks both)


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


def _nan_checks(x, pred, index, msgs, *, on_error):
    """equinox's check with its default mode read as "nan" (``runtime_checks_as_nan``)."""
    return equinox_errors.branched_error_if_impl(x, pred, index, msgs, on_error="nan" if on_error == "default" else on_error)


# a jitted check of its own, so its trace cache only ever holds NaN-returning checks
_NAN_CHECKS_JIT = eqx.filter_jit(_nan_checks)


@contextlib.contextmanager
def runtime_checks_as_nan():
    """Trace with equinox's runtime checks as NaN-returning selects instead of host callbacks.

    diffrax checks ``SaveAt(ts=...)`` with ``eqx.error_if``, which lowers to a Python callback; JAX
    never writes an executable holding a callback to its persistent cache.  equinox reads its
    ``EQX_ON_ERROR`` environment variable only at import, so the switch is flipped at trace time.
    A check on arrays goes through equinox's own jitted implementation, which reads the switch while
    tracing: JAX kept that trace and served it again for equal shapes whatever the switch said then,
    so a check first traced outside this context (raising) came back inside it (a raising host callback
    in a solve's program, depending on what the process traced before), and the other way round.  Inside
    the context such checks therefore go through ``_NAN_CHECKS_JIT``, a jitted check of its own.
    """
    old, old_jit = equinox_errors.EQX_ON_ERROR, equinox_errors.branched_error_if_impl_jit
    equinox_errors.EQX_ON_ERROR = "nan"
    equinox_errors.branched_error_if_impl_jit = _NAN_CHECKS_JIT
    try:
        yield
    finally:
        equinox_errors.EQX_ON_ERROR = old
        equinox_errors.branched_error_if_impl_jit = old_jit
