"""One bounded cache of compiled executables, and JAX's persistent compilation cache.

Every compiled solve of gradflow (the flow, batches, crossings, phases, learning times) comes from
``compiled``: executables are keyed by the structure of their arguments, kept least-recently-used
up to ``CACHE_SIZE``, and counted (``compilation_count``).  Each compiled flow holds about 1,000 memory
maps (XLA:CPU maps every kernel apart) and a Linux process past ``vm.max_map_count`` (65,530 by default)
aborts inside its next compilation, so before compiling, ``release_memory_maps`` drops least-recently-used
executables while the process holds more than ``MAP_SHARE`` of that limit.  The first compilation turns on JAX's
persistent compilation cache in ``~/.cache/gradflow/jax`` (``GRADFLOW_CACHE_DIR`` relocates it,
``GRADFLOW_NO_CACHE=1`` turns it off), so a new process loads the executable from disk.

That cache holds XLA's executables, keyed by the program, so a new process would still trace the
Python code to find its program (seconds for a flow).  ``compiled(..., export=True)`` therefore also
keeps the traced program itself (``jax.export``, serialised StableHLO) in ``<cache>/exported``, keyed by
the arguments' structure, gradflow's source and the versions of jax: a warm process deserialises it
and goes straight to the persistent cache, tracing nothing.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import pickle
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from gradflow._dependencies import runtime_checks_as_nan
from gradflow._version import versions

CACHE_SIZE = 64  # compiled executables kept in memory (least recently used dropped first)
MAP_SHARE = 0.5  # executables are dropped while the process's memory maps exceed this share of vm.max_map_count
CACHE_MAX_BYTES = 2 << 30  # the persistent cache folder's size limit when gradflow sets it up
# the persistent cache keeps programs that compiled for at least this long (JAX's default: JAX_MIN_COMPILE_SECONDS)
MIN_COMPILE_SECONDS = 0.1
JAX_MIN_COMPILE_SECONDS = 1.0
# XLA:CPU's options for every program compiled here: its classic elemental emitters instead of the fusion emitters
# (XLA's default): a flow compiles 20-35% faster (docs/guide/details.md, benchmarks/bench_compile.py)
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# and for a ``quick`` program (one config's solve, crossing or learning time: it runs for milliseconds after seconds of
# compiling) XLA's optimisation level 0 too: the default flow compiles about a third faster and runs a few ms slower,
# while a wide vmapped batch would run about 3x slower, so batches keep the level XLA_FLAGS sets (default 3)
QUICK_CPU_COMPILER_OPTIONS = {**CPU_COMPILER_OPTIONS, "xla_backend_optimization_level": 0}
# XLA's while-loop passes, which a request with ``loop_passes=False`` compiles without: run to a fixed point they hoist
# invariants out of nested loops one level per round, most of the compile of a program of loops within loops (a single
# learning time: its stages around the solve around the event's root find) and no help to its run time
WHILE_LOOP_PASSES = ("simplify-while-loops", "while-loop-invariant-code-motion", "while-loop-constant-sinking")

_COMPILED: OrderedDict = OrderedDict()
_COMPILATIONS = 0
_TRACES = 0
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


def programs_traced() -> int:
    """How many programs this process traced for ``compiled`` (a warm process that found them on disk: 0)."""
    return _TRACES


def persistent_cache_dir() -> str | None:
    """The folder of JAX's persistent compilation cache that gradflow set up (None: off or not yet)."""
    return _PERSISTENT_CACHE["dir"]


def enable_persistent_cache() -> str | None:
    """Turn on JAX's persistent compilation cache once per process; returns its folder or None.

    Default folder: ``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow/jax``, else
    ``~/.cache/gradflow/jax``, limited to 2 GiB (least recently used entries evicted) when the
    ``filelock`` package is installed (JAX needs it for the limit), unlimited otherwise.
    Programs that compiled in ``MIN_COMPILE_SECONDS`` or more are kept (JAX's default, 1 s, would leave out one
    config's rewards and read-out programs, which then compiled again in every new process), unless the user changed
    JAX's setting.  ``GRADFLOW_NO_CACHE=1`` turns it off; a folder that cannot be created (e.g. a file of that name)
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
        if jax.config.jax_persistent_cache_min_compile_time_secs == JAX_MIN_COMPILE_SECONDS:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        if jax.config.jax_compilation_cache_max_size in (None, -1) and _has_module("filelock"):
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)  # LRU eviction past 2 GiB
        try:  # jax reads the folder once, at its first compilation: start over if that already happened
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        except Exception:  # noqa: BLE001  (an older or newer jax without it: the setting still applies)
            pass
    _PERSISTENT_CACHE["dir"] = path
    return path


def memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the kernel's limit ``vm.max_map_count``); None where unknown (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return maps.read().count(b"\n"), int(limit.read())
    except (OSError, ValueError):
        return None


def release_memory_maps() -> int:
    """Drop compiled executables, least recently used first (then JAX's own caches), while this process holds
    more than ``MAP_SHARE`` of ``vm.max_map_count`` memory maps; returns how many of ours were dropped.

    A process past the limit aborts in the next compilation (XLA cannot map its code); each compiled flow
    holds about 1,000 maps, so 64 cached flows alone reach the default limit of 65,530."""
    usage = memory_maps()
    if usage is None:
        return 0
    count, limit = usage
    dropped = 0
    while count > MAP_SHARE * limit and _COMPILED:
        for _ in range(max(1, len(_COMPILED) // 4)):  # a quarter at a time: each count reads the maps again
            _COMPILED.popitem(last=False)
            dropped += 1
        gc.collect()
        count = memory_maps()[0]
    if count > MAP_SHARE * limit:
        jax.clear_caches()
        gc.collect()
    return dropped


def _has_module(name: str) -> bool:
    """Whether an optional package JAX uses (filelock: the size-limited cache; flatbuffers: ``jax.export``) is installed."""
    return importlib.util.find_spec(name) is not None


def cpu_compiler_options(quick: bool = False, loop_passes: bool = True) -> dict:
    """XLA:CPU's options for a program: ``CPU_COMPILER_OPTIONS`` (``quick``: ``QUICK_CPU_COMPILER_OPTIONS``), without
    ``WHILE_LOOP_PASSES`` unless ``loop_passes``."""
    options = QUICK_CPU_COMPILER_OPTIONS if quick else CPU_COMPILER_OPTIONS
    return options if loop_passes else {**options, "xla_disable_hlo_passes": ",".join(WHILE_LOOP_PASSES)}


def compile_lowered(lowered: jax.stages.Lowered, quick: bool = False, loop_passes: bool = True) -> jax.stages.Compiled:
    """XLA-compile a lowered program, with ``cpu_compiler_options(quick, loop_passes)`` when it runs on CPU."""
    if jax.default_backend() != "cpu":
        return lowered.compile()
    return lowered.compile(compiler_options=cpu_compiler_options(quick, loop_passes))


def structure_key(tree) -> tuple:
    """What a compiled executable depends on: the tree structure and each leaf's shape and dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


class CompileRequest(NamedTuple):
    """One program for ``compiled`` / ``compiled_together``: ``fn(*args)`` under a name and a static key.

    kind: a name for the computation, part of the cache key.  fn: the function to jit and compile.  args: the example
    arguments; their tree structure, shapes and dtypes (``structure_key``) are part of the key.  static_key (Hashable):
    anything else the executable depends on (part of the key).  export: keep the traced program on disk
    (``exported_lowered``) so that a new process skips tracing; for functions without host callbacks (no progress
    meter) on one device.  quick: compile with ``QUICK_CPU_COMPILER_OPTIONS`` (a program that runs briefly: one config).
    loop_passes: False compiles without XLA's ``WHILE_LOOP_PASSES`` (a program of nested loops whose compile they
    dominate)."""

    kind: str
    fn: Callable
    args: tuple
    static_key: Hashable = ()
    export: bool = False
    quick: bool = False
    loop_passes: bool = True


def compiled(
    kind: str, fn: Callable, args: tuple, static_key=(), export: bool = False, quick: bool = False, loop_passes: bool = True
) -> tuple[Callable, float]:
    """The compiled ``fn(*args)`` for this structure (bounded LRU cache), and its compile time (0 when cached).

    Args: as ``CompileRequest``'s fields (kind, fn, args, static_key, export, quick, loop_passes).

    Returns:
        The compiled executable and its compile time in seconds (0.0 when it came from the cache).
    """
    request = CompileRequest(kind, fn, args, static_key, export, quick, loop_passes)
    key = _key(request)
    if (executable := _cached(key)) is not None:
        return executable, 0.0
    folder = _before_compiling()
    start = time.perf_counter()
    with runtime_checks_as_nan():
        executable, traced = _build(folder, request)
    _keep(key, executable, traced)
    return executable, time.perf_counter() - start


def compiled_together(requests: list[tuple]) -> int:
    """Compile the missing ones of several ``compiled`` requests (``CompileRequest``s or tuples of its fields) side by
    side, one thread per core (``run_together``), and keep them, so that each later ``compiled`` call with the same
    request finds its executable.  Returns how many were compiled (or loaded from the persistent cache) here."""
    missing = {}
    for request in (CompileRequest(*fields) for fields in requests):
        if (key := _key(request)) not in _COMPILED:
            missing[key] = request
    if missing:
        run_together(list(missing.values()), lambda i, executable: None)
    return len(missing)


def run_together(requests: list[tuple], use: Callable[[int, Callable], Any]) -> list:
    """``use(i, executable)`` for each of several ``compiled`` requests (``CompileRequest``s or tuples of its fields),
    on a thread per core, each as soon as its program is compiled (or found in the cache): a figure's solves run while
    its other programs still compile.  The requests start in the order given (put the longest first).

    XLA compiles, and an executable runs, with Python's lock released, so both cores stay busy; tracing takes turns.
    Returns the uses' results in the requests' order."""
    requests = [CompileRequest(*fields) for fields in requests]
    folder = _before_compiling()
    lock = threading.Lock()

    def job(i: int, request: CompileRequest):
        key = _key(request)
        with lock:
            executable = _cached(key)
        if executable is None:
            executable, traced = _build(folder, request)
            with lock:
                _keep(key, executable, traced)
        return use(i, executable)

    with runtime_checks_as_nan(), ThreadPoolExecutor(max_workers=max(1, min(len(requests), os.cpu_count() or 1))) as pool:
        futures = [pool.submit(job, i, request) for i, request in enumerate(requests)]
        return [future.result() for future in futures]


def _cached(key: tuple) -> Callable | None:
    """The executable kept under ``key`` (marked most recently used), or None."""
    if key not in _COMPILED:
        return None
    _COMPILED.move_to_end(key)
    return _COMPILED[key]


def _key(request: CompileRequest) -> tuple:
    """An executable's key in the in-memory cache: its kind, its arguments' structure, its static key and its options."""
    return request.kind, structure_key(request.args), request.static_key, request.quick, request.loop_passes


def _before_compiling():
    """float64 checked, the persistent cache folder set up (returned; None when off), memory maps to spare."""
    require_x64()
    folder = enable_persistent_cache()
    release_memory_maps()
    return folder


def _build(folder, request: CompileRequest) -> tuple[Callable, bool]:
    """(executable, whether fn was traced) of one request (``compiled``), inside ``runtime_checks_as_nan``."""
    lowered, traced, wrap = _lowered(folder, request)
    return wrap(compile_lowered(lowered, request.quick, request.loop_passes)), traced


def _lowered(folder, request: CompileRequest) -> tuple[jax.stages.Lowered, bool, Callable]:
    """(the request's lowered program, whether fn was traced, what makes the compiled program callable as fn): from
    its traced program kept on disk (``exported_lowered``) where it asks for that, else traced here."""
    if request.export and folder is not None:
        kept = Path(folder) / "exported"
        lowered, traced, wrap = exported_lowered(kept, request.kind, request.fn, request.args, request.static_key)
        if lowered is not None:
            return lowered, traced, wrap
    return jax.jit(request.fn).lower(*request.args), True, lambda executable: executable


def compiled_in_turn(requests: list[CompileRequest], longest: int = 0) -> tuple[list[Callable], float]:
    """The executables of several ``compiled`` requests, traced in order on this thread while the ones before compile
    on other threads (XLA compiles with Python's lock released): a program's tracing, lowering and compilation hide
    behind another's compilation.  The request at index ``longest`` compiles on a thread of its own, the others on
    the remaining cores (on two cores, one thread: the longest then shares its core with no other compilation, only
    with this thread's tracing).  A short program traced before the longest compiles while the longest traces, and
    the jitted functions they share are traced once, for it.  Returns them in order, and the wall seconds."""
    start = time.perf_counter()
    folder = _before_compiling()
    found, pending = {}, {}
    others = max(1, (os.cpu_count() or 2) - 1)
    with runtime_checks_as_nan(), ThreadPoolExecutor(max_workers=1) as first, ThreadPoolExecutor(others) as rest:
        for i, request in enumerate(requests):
            key = _key(request)
            if (executable := _cached(key)) is not None:
                found[i] = executable
                continue
            lowered, traced, wrap = _lowered(folder, request)
            pool = first if i == longest else rest
            pending[i] = (key, traced, wrap, pool.submit(compile_lowered, lowered, request.quick, request.loop_passes))
        for i, (key, traced, wrap, future) in pending.items():
            found[i] = wrap(future.result())
            _keep(key, found[i], traced)
    return [found[i] for i in range(len(requests))], (time.perf_counter() - start if pending else 0.0)


def _keep(key, executable: Callable, traced: bool) -> None:
    """Count one compilation (and its trace) and keep the executable (bounded LRU)."""
    global _COMPILATIONS, _TRACES
    _TRACES += traced
    _COMPILATIONS += 1
    _COMPILED[key] = executable
    while len(_COMPILED) > CACHE_SIZE:
        _COMPILED.popitem(last=False)


_SOURCE_DIGEST: dict = {}


def _source_digest() -> str:
    """sha256 of gradflow's source files and the versions it runs with: a traced program is valid for these only."""
    if "digest" not in _SOURCE_DIGEST:
        digest = hashlib.sha256(repr(sorted(versions().items())).encode())
        for path in sorted(Path(__file__).parent.rglob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
        _SOURCE_DIGEST["digest"] = digest.hexdigest()
    return _SOURCE_DIGEST["digest"]


def _export_key(kind: str, args: tuple, static_key) -> str | None:
    """The file name of a traced program, or None when its static data is not reproducible across processes
    (a function or object shown by address, e.g. a plain-callable schedule)."""
    treedef, leaves = structure_key(args)
    text = repr((kind, str(treedef), leaves, static_key, jax.default_backend()))
    if " at 0x" in text:
        return None
    return hashlib.sha256((_source_digest() + text).encode()).hexdigest()[:32]


def exported_program(
    folder: Path, kind: str, fn: Callable, args: tuple, static_key=(), quick: bool = False
) -> tuple[Callable | None, bool]:
    """``fn(*args)`` compiled from its traced program kept in ``folder`` (traced and kept there when missing):
    ``exported_lowered``, compiled (``quick``: with ``QUICK_CPU_COMPILER_OPTIONS``).

    Returns:
        (executable, traced): the executable, None where ``jax.export`` cannot serialise the program (the
        caller then compiles as usual), and whether ``fn`` was traced here.
    """
    lowered, traced, wrap = exported_lowered(folder, kind, fn, args, static_key)
    return (None, traced) if lowered is None else (wrap(compile_lowered(lowered, quick)), traced)


def exported_lowered(
    folder: Path, kind: str, fn: Callable, args: tuple, static_key=()
) -> tuple[jax.stages.Lowered | None, bool, Callable | None]:
    """``fn(*args)`` lowered from its traced program kept in ``folder`` (traced and kept there when missing).

    The program takes and returns flat lists of arrays: the arguments' tree structure is part of the key
    and the result's is stored beside the program (a skeleton of the output with 0 leaves).

    Returns:
        (lowered, traced, wrap): the lowered program, None where ``jax.export`` cannot serialise it (the caller
        then traces it as usual); whether ``fn`` was traced here; and ``wrap``, which makes the compiled program a
        function of ``args``' tree (returning ``fn``'s tree).
    """
    key = _export_key(kind, args, static_key)
    if key is None or not _has_module("flatbuffers"):  # jax serialises with flatbuffers: without it, never trace twice
        return None, False, None
    leaves, treedef = jax.tree_util.tree_flatten(args)
    specs = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
    path = folder / f"{kind}-{key}.bin"
    traced = False
    try:
        with open(path, "rb") as handle:
            blob, skeleton = pickle.load(handle)
        program = jax_export.deserialize(bytearray(blob))
    except Exception:  # noqa: BLE001  (missing, unreadable or from another version: trace it again)
        traced = True
        box = {}

        def flat(*xs):
            out = fn(*jax.tree_util.tree_unflatten(treedef, xs))
            out_leaves, box["tree"] = jax.tree_util.tree_flatten(out)
            return tuple(out_leaves)

        try:
            program = jax_export.export(jax.jit(flat))(*specs)
            blob = program.serialize()
        except Exception:  # noqa: BLE001  (host callbacks or shardings: not exportable)
            return None, True, None
        skeleton = jax.tree_util.tree_unflatten(box["tree"], [0] * box["tree"].num_leaves)
        _write_atomic(path, pickle.dumps((bytes(blob), skeleton)))
    out_tree = jax.tree_util.tree_structure(skeleton)

    def wrap(executable: Callable) -> Callable:
        return lambda *call_args: jax.tree_util.tree_unflatten(out_tree, executable(*jax.tree_util.tree_leaves(call_args)))

    return jax.jit(program.call).lower(*specs), traced, wrap


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file (a reader never sees half a file); failures are ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        pass
