"""One bounded cache of compiled executables, and JAX's persistent compilation cache.

Every compiled solve of gradflow (the flow, batches, crossings, phases, learning times) comes from
``compiled``: executables are keyed by the structure of their arguments, kept least-recently-used
up to ``CACHE_SIZE``, and counted (``compilation_count``).  The first compilation turns on JAX's
persistent compilation cache in ``~/.cache/gradflow/jax`` (``GRADFLOW_CACHE_DIR`` relocates it,
``GRADFLOW_NO_CACHE=1`` turns it off), so a new process loads the executable from disk.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradflow._dependencies import runtime_checks_as_nan

CACHE_SIZE = 64  # compiled executables kept in memory (least recently used dropped first)
CACHE_MAX_BYTES = 2 << 30  # the persistent cache folder's size limit when gradflow sets it up

_COMPILED: OrderedDict = OrderedDict()
_COMPILATIONS = 0
_PERSISTENT_CACHE: dict = {"configured": False, "dir": None}


def require_x64() -> None:
    """RuntimeError unless JAX runs in float64 (``jax_enable_x64``), which every gradflow solve needs."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "gradflow needs float64: jax_enable_x64 was turned off after importing gradflow. Rewards approach 1 and "
            "gradients become tiny, so a float32 flow would stall; turn it back on with "
            "jax.config.update('jax_enable_x64', True)"
        )


def compilation_count() -> int:
    """How many flow executables have been compiled in this process (solves, batches, crossings)."""
    return _COMPILATIONS


def persistent_cache_dir() -> str | None:
    """The folder of JAX's persistent compilation cache that gradflow set up (None: off or not yet)."""
    return _PERSISTENT_CACHE["dir"]


def enable_persistent_cache() -> str | None:
    """Turn on JAX's persistent compilation cache once per process; returns its folder or None.

    Default folder: ``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow/jax``, else
    ``~/.cache/gradflow/jax``, limited to 2 GiB (least recently used entries evicted) when the
    ``filelock`` package is installed (JAX needs it for the limit), unlimited otherwise.
    ``GRADFLOW_NO_CACHE=1`` turns it off; a folder that cannot be created (e.g. a file of that name)
    turns it off with a warning naming the folder; a folder the user already gave JAX
    (``jax_compilation_cache_dir``) is kept.  Called by the first compiled solve, not at import.
    """
    if _PERSISTENT_CACHE["configured"]:
        return _PERSISTENT_CACHE["dir"]
    _PERSISTENT_CACHE["configured"] = True
    if os.environ.get("GRADFLOW_NO_CACHE", "") not in ("", "0"):
        return None
    path = jax.config.jax_compilation_cache_dir
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.environ.get("GRADFLOW_CACHE_DIR") or os.path.join(base, "gradflow", "jax")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            source = "GRADFLOW_CACHE_DIR" if os.environ.get("GRADFLOW_CACHE_DIR") else "the cache folder"
            warnings.warn(
                f"{source} {path!r} cannot be used for JAX's persistent compilation cache ({error.strerror or error}): "
                "the cache is off for this process (compiled flows are not kept on disk)",
                stacklevel=2,
            )
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        if jax.config.jax_compilation_cache_max_size in (None, -1) and _has_filelock():
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # LRU eviction past 2 GiB
        try:  # jax reads the folder once, at its first compilation: start over if that already happened
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        except Exception:  # noqa: BLE001  (an older or newer jax without it: the setting still applies)
            pass
    _PERSISTENT_CACHE["dir"] = path
    return path


def _has_filelock() -> bool:
    """JAX's size-limited cache needs the filelock package (without it every cache read fails)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def structure_key(tree) -> tuple:
    """What a compiled executable depends on: the tree structure and each leaf's shape and dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def compiled(kind: str, fn: Callable, args: tuple, static_key=()) -> tuple[Callable, float]:
    """The compiled ``fn(*args)`` for this structure (bounded LRU cache), and its compile time (0 when cached).

    Args:
        kind: a name for the computation, part of the cache key.
        fn: the function to jit and compile.
        args: the example arguments; their tree structure, shapes and dtypes (``structure_key``) are part of the key.
        static_key (Hashable): anything else the executable depends on (part of the key).

    Returns:
        The compiled executable and its compile time in seconds (0.0 when it came from the cache).
    """
    global _COMPILATIONS
    key = (kind, structure_key(args), static_key)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    require_x64()
    enable_persistent_cache()
    start = time.perf_counter()
    with runtime_checks_as_nan():
        executable = jax.jit(fn).lower(*args).compile()
    _COMPILATIONS += 1
    _COMPILED[key] = executable
    while len(_COMPILED) > CACHE_SIZE:
        _COMPILED.popitem(last=False)
    return executable, time.perf_counter() - start
