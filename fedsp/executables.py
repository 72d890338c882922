"""Compiled programs saved to disk and loaded in a new process without tracing them.

JAX's persistent cache (`fedsp.compilation_cache`) spares a new process XLA's compile,
but JAX still traces and lowers the function to find the cache entry: for the sampler
and the mapped local training, seconds of every run's start. `Program` wraps a
``jax.jit`` function whose program is fixed by its arguments' structure, shapes,
dtypes and shardings plus a static key the caller gives; it keys the compiled
executable by those (with fedsp's source, the jax version, the devices and the mesh
context), keeps it in memory, and serialises it to ``executables/`` beside JAX's cache
(`compilation_cache.enable`). A later process with the same key loads it from there
and never runs the Python function.

`prefetch` starts loading, in background threads, the programs the last process with
the same tag (a run's config) used, so they load while the model does.

The static key is the caller's promise: everything the traced function reads besides
its arguments (static arguments, closed-over settings such as the run's config) must be
in it. fedsp's own source is in every key, so editing fedsp starts over (a program is
compiled under a name that carries its key, so JAX's cache does not serve it an old
version's executable: one that JAX loaded from its cache cannot be serialised again on
CPU, and is then used but not stored). ``jax.clear_caches()`` drops the executables a
process holds, as it drops jit's. Under a transformation (tracers among the arguments)
and in multi-process runs the plain ``jax.jit`` function runs. Entries are written atomically (a temporary file,
then a rename); an entry that fails to load is deleted and compiled again. As with
JAX's cache, anyone who can write the directory can make your processes run their code.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import pathlib
import pickle
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent import futures
from typing import Any

import jax
from jax import monitoring
from jax.experimental import serialize_executable

from fedsp import compilation_cache

__all__ = ["MAX_BYTES", "Program", "code_key", "prefetch", "source_digest"]

log = logging.getLogger(__name__)

# Least recently used entries go first beyond this (fedsp's source is in every key, so
# each new version of fedsp writes a new set).
MAX_BYTES = 2 << 30
_SUFFIX = ".xla"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


@functools.cache
def source_digest() -> str:
    """SHA-256 of fedsp's Python source (every ``.py`` file of the package)."""
    root = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_key(obj: Any) -> tuple[str, str]:
    """The module that defines ``obj``'s type and, outside fedsp, its source's SHA-256:
    for a static key over user code (fedsp's own source is in every key already)."""
    cls = obj if isinstance(obj, type) else type(obj)
    module = sys.modules.get(cls.__module__)
    name = cls.__module__ + "." + cls.__qualname__
    if cls.__module__.split(".")[0] == "fedsp" or module is None:
        return name, ""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = "unknown source " + str(id(module))  # never equal across processes
    return name, hashlib.sha256(source.encode()).hexdigest()


def _stable(value: Any) -> bytes | None:
    """Bytes that are equal across processes for equal values: the pickle, else a repr
    without object addresses; None for neither."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # anything unpicklable falls back to its repr
        text = repr(value)
        return None if _ADDRESS.search(text) else text.encode()


def _leaf_key(leaf: Any) -> tuple[Any, ...]:
    sharding = getattr(leaf, "sharding", None)
    return (
        tuple(getattr(leaf, "shape", ())),
        str(getattr(leaf, "dtype", type(leaf).__name__)),
        bool(getattr(leaf, "weak_type", False)),
        repr(sharding) if sharding is not None else None,
    )


def _trace_context() -> str:
    """JAX's settings that change what a function traces to (the ones ``jax.jit`` keys
    its own cache by), without object addresses."""
    try:
        from jax._src.config import trace_context  # what jit's cache key uses
    except ImportError:  # a jax without it: the public settings that matter most
        return repr((jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision))  # type: ignore[attr-defined]
    return _ADDRESS.sub("", repr(trace_context()))


def _environment() -> tuple[Any, ...]:
    devices = jax.devices()
    return (
        source_digest(),
        jax.__version__,
        devices[0].client.platform_version,
        tuple((d.id, d.device_kind) for d in devices),
        os.environ.get("XLA_FLAGS", ""),
        _trace_context(),
        repr(jax.sharding.get_abstract_mesh()),
    )


class Program:
    """``jax.jit(fn, static_argnames=...)`` called through compiled executables kept
    across processes.

    Args:
      fn: the function to compile (not yet jitted).
      name: names the program in the key and the log (e.g. ``"fedsp.sampling.generate"``).
      static_key: anything picklable (or with an address-free ``repr``) that, with the
        arguments' shapes, fixes the program besides ``fn``'s static arguments (see
        the module docstring).
      static_argnames: ``fn``'s static arguments (by name, passed by position or
        keyword): part of the key, left out of the call to the executable.

    Calls take ``fn``'s arguments and return its results. ``jitted`` is the plain
    ``jax.jit`` of ``fn``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        static_key: Hashable = None,
        static_argnames: tuple[str, ...] = (),
    ):
        self.fn = fn
        self.jitted = jax.jit(fn, static_argnames=static_argnames)
        self.name = name
        self.static_key = static_key
        self.static_argnames = frozenset(static_argnames)
        self._parameters = list(inspect.signature(fn).parameters)
        self._static_positions = frozenset(
            i for i, name in enumerate(self._parameters) if name in self.static_argnames
        )
        self._executables: dict[str, jax.stages.Compiled] = {}
        self._lock = threading.Lock()
        _register_with_jax(self)

    def cache_size(self) -> int:
        """Distinct executables this process has compiled or loaded."""
        return len(self._executables)

    def cache_clear(self) -> None:
        """Drops the executables held in memory (``jax.clear_caches()`` calls it)."""
        with self._lock:
            self._executables.clear()

    def cache_info(self) -> str:
        return f"{self.name}: {len(self._executables)} executables"

    def cache_keys(self) -> list[str]:
        return list(self._executables)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        static = {k: v for k, v in kwargs.items() if k in self.static_argnames}
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        static.update(
            (self._parameters[i], args[i]) for i in self._static_positions if i < len(args)
        )
        dynamic_args = tuple(a for i, a in enumerate(args) if i not in self._static_positions)
        leaves, treedef = jax.tree.flatten((dynamic_args, dynamic))
        if jax.process_count() > 1 or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self.jitted(*args, **kwargs)
        key = self._key(static, treedef, leaves)
        if key is None:
            return self.jitted(*args, **kwargs)
        executable = self._executables.get(key)
        if executable is None:
            with self._lock:
                executable = self._executables.get(key)
                if executable is None:
                    executable = self._load_or_compile(key, args, kwargs)
                    self._executables[key] = executable
        return executable(*dynamic_args, **dynamic)

    def _key(self, static: dict[str, Any], treedef: Any, leaves: list[Any]) -> str | None:
        """The entry's name, or None when a static part has no stable form (then the
        jitted function runs as usual)."""
        parts = [self.name.encode()]
        for value in (self.static_key, sorted(static.items()), treedef):
            stable = _stable(value)
            if stable is None:
                return None
            parts.append(stable)
        parts.append(repr((tuple(_leaf_key(x) for x in leaves), _environment())).encode())
        digest = hashlib.sha256()
        for part in parts:
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()

    def _load_or_compile(
        self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> jax.stages.Compiled:
        directory = _directory()
        path = directory / f"{key}{_SUFFIX}" if directory is not None else None
        if path is not None:
            _note_used(key)
            executable = _prefetched(key)
            if executable is None:
                executable = _load(path, self.name)
            if executable is not None:
                return executable
        # Named after the key, so JAX's own cache (which would otherwise hold the same
        # program from an earlier version of fedsp) has it only if this store lost it.
        jitted = jax.jit(
            _renamed(self.fn, f"{self.fn.__name__}_{key[:16]}"),
            static_argnames=tuple(self.static_argnames),
        )
        hits = _jax_cache_hits()
        executable = jitted.lower(*args, **kwargs).compile()
        # An executable JAX loaded from its own cache serialises to a copy that fails to
        # run on CPU ("Function ... not found", jaxlib 0.10): only fresh compiles are kept.
        if path is not None and _jax_cache_hits() == hits:
            _save(path, executable, self.name)
        return executable


def _register_with_jax(program: Program) -> None:
    """Makes ``jax.clear_caches()`` drop ``program``'s executables, as it drops jit's."""
    try:
        from jax._src.util import register_cache  # JAX's registry of clearable caches
    except ImportError:  # a jax without it: `Program.cache_clear` by hand
        return
    register_cache(program, program.name)


def _renamed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def renamed(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    renamed.__name__ = renamed.__qualname__ = name
    return renamed


_THREAD = threading.local()
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _count_hit(event: str, **_: Any) -> None:
    if event == _HIT_EVENT:
        _THREAD.hits = getattr(_THREAD, "hits", 0) + 1


monitoring.register_event_listener(_count_hit)


def _jax_cache_hits() -> int:
    """Executables JAX's persistent cache loaded on this thread so far."""
    return getattr(_THREAD, "hits", 0)


def _directory() -> pathlib.Path | None:
    cache = compilation_cache.directory()
    if cache is None:
        return None
    directory = cache / "executables"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _load(path: pathlib.Path, name: str, *, background: bool = False) -> jax.stages.Compiled | None:
    start = time.perf_counter()
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        serialized, in_tree, out_tree, device_ids = pickle.loads(payload)
        by_id = {d.id: d for d in jax.devices()}
        executable = serialize_executable.deserialize_and_load(
            serialized, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids]
        )
    except Exception as error:  # any unreadable entry is compiled again
        log.warning("%s: dropping unreadable compiled program %s (%s)", name, path, error)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # recently used: evicted last
    compilation_cache.record_load(time.perf_counter() - start, background=background)
    return executable


def _save(path: pathlib.Path, executable: jax.stages.Compiled, name: str) -> None:
    try:
        # The devices it runs on (deserialising loads it for all devices otherwise).
        runtime = executable.runtime_executable()
        if runtime is None:
            raise ValueError("no runtime executable")
        device_ids = [d.id for d in runtime.local_devices()]
        payload = pickle.dumps((*serialize_executable.serialize(executable), device_ids))
    except (ValueError, NotImplementedError, pickle.PicklingError) as error:
        log.info("%s: not saved, the executable cannot be serialised (%s)", name, error)
        return
    if _write_atomically(path, payload):
        _evict(path.parent)


def _write_atomically(path: pathlib.Path, data: bytes) -> bool:
    """Writes ``data`` to a temporary file beside ``path``, then renames it; False (and
    a logged warning) when the disk refuses."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("could not write %s (%s)", path, error)
        return False
    return True


def _evict(directory: pathlib.Path) -> None:
    entries = []
    for path in directory.glob(f"*{_SUFFIX}"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        path.unlink(missing_ok=True)
        total -= size


# Prefetching: the programs a tag (a run's config) used are listed in
# ``manifest-<digest>.json``; `prefetch` loads them on background threads.
_PREFETCH_LOCK = threading.Lock()
_PREFETCHED: dict[str, futures.Future[jax.stages.Compiled | None]] = {}
_MANIFEST: dict[str, Any] = {"path": None, "keys": []}


def _manifest_path(directory: pathlib.Path, tag: str) -> pathlib.Path:
    digest = hashlib.sha256(repr((tag, _environment())).encode()).hexdigest()
    return directory / f"manifest-{digest}.json"


def prefetch(tag: str, *, max_workers: int = 2) -> int:
    """Starts loading the programs that the last process with ``tag`` used (each once,
    on ``max_workers`` background threads) and lists the programs this process uses
    from now on under ``tag``. Returns how many loads it started; 0 when the store is
    off or ``tag`` is new.

    A `Program` call that needs a prefetched executable waits for its load instead of
    loading it again; prefetched executables nobody asks for are dropped.
    """
    directory = _directory()
    if directory is None or jax.process_count() > 1:
        return 0
    path = _manifest_path(directory, tag)
    try:
        keys = [str(k) for k in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        keys = []
    with _PREFETCH_LOCK:
        _MANIFEST.update(path=path, keys=[])
        todo = [k for k in keys if k not in _PREFETCHED]
        if not todo:
            return 0
        pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="fedsp-prefetch")
        for key in todo:
            entry = directory / f"{key}{_SUFFIX}"
            _PREFETCHED[key] = pool.submit(_load, entry, "prefetch", background=True)
        pool.shutdown(wait=False)
    return len(todo)


def _prefetched(key: str) -> jax.stages.Compiled | None:
    with _PREFETCH_LOCK:
        future = _PREFETCHED.pop(key, None)
    if future is None:
        return None
    start = time.perf_counter()
    executable = future.result()
    compilation_cache.record_wait(time.perf_counter() - start)
    return executable


def _note_used(key: str) -> None:
    """Adds ``key`` to the current tag's manifest (rewritten atomically)."""
    with _PREFETCH_LOCK:
        path = _MANIFEST["path"]
        if path is None or key in _MANIFEST["keys"]:
            return
        _MANIFEST["keys"].append(key)
        text = json.dumps(_MANIFEST["keys"])
    _write_atomically(path, text.encode())
