"""A real Flower deployment on localhost: one SuperLink and N SuperNodes, for tests.

`LocalFederation` starts ``flower-superlink`` and ``flower-supernode`` as separate
processes on 127.0.0.1, waits until every SuperNode has registered, and runs a Flower
App on them with ``flwr run --stream``, as an operator would on real machines. It is
what the deployment tests use to check that an App works outside the simulation
engine, including when a SuperNode dies mid-run (`kill_node`)::

    with LocalFederation("path/to/app", num_nodes=2, home=tmp_path) as federation:
        done = federation.run({"num-server-rounds": 2}, timeout=120)

Everything runs offline: the SuperLink and the SuperNodes never install an App's
dependencies at run time (no ``uv sync``; the App runs in this interpreter's
environment) and Flower's telemetry is off (``env`` may turn it back on). Every process
gets ``FLWR_HOME=home``, where the SuperLink connection (``config.toml``), the installed
App bundles (``apps/``) and the logs (``logs/``) live, and this interpreter's scripts
directory first on ``PATH``: the SuperLink and SuperNodes start ``flower-superexec``,
``flwr-serverapp`` and ``flwr-clientapp`` by name. The ClientApp and ServerApp
processes inherit the environment of their SuperNode / SuperLink, so ``env`` reaches
them too.

Process layout, as Flower 1.42 starts it (the processes started here lead a process
group each; the SuperLink's SuperExec starts a session of its own)::

    flower-superlink ── flower-superexec ── flwr-serverapp, one per run
    flower-supernode ── flower-superexec ── flwr-clientapp, one per message

All of them carry an environment variable naming this federation (and the node), which
is how `kill_node` and `__exit__` find the ones that left their process group.
Finding them reads ``/proc``, so it is Linux only; elsewhere the process groups are all
that is signalled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["ConfigValue", "LocalFederation"]

ConfigValue = str | int | float | bool
"""A run-config or node-config value: what TOML's scalars hold."""

# Connection name in $FLWR_HOME/config.toml.
CONNECTION = "fedsp-local"
# Every process started here carries `_MARKER=<federation id>/<role>`.
_MARKER = "FEDSP_LOCAL_FEDERATION"
# How long processes get between SIGTERM and SIGKILL in `__exit__`.
_TERMINATE_GRACE_S = 10.0
# How long one `flwr supernode list` may take.
_CLI_TIMEOUT_S = 30.0
_POLL_S = 0.25
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID_LINE = re.compile(r"Successfully started run (\d+)")


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, as a context manager.

    Args:
      app_dir: the Flower App's directory (with its ``pyproject.toml``).
      num_nodes: how many SuperNodes to start.
      node_configs: one node config per SuperNode (``--node-config``); by default
        ``{"partition-id": i, "num-partitions": num_nodes}`` for SuperNode ``i``.
      home: an empty or new directory, used as ``FLWR_HOME`` and for the logs.
      env: environment variables for every process started, over ``os.environ``.
      register_timeout: seconds `__enter__` waits for every SuperNode to register.

    Attributes:
      address: the SuperLink's ``host:port`` (Fleet, Control and Runtime APIs).
      node_ids: the SuperLink's id of each SuperNode, in order, once entered.
    """

    def __init__(
        self,
        app_dir: str | Path,
        num_nodes: int,
        *,
        node_configs: Sequence[Mapping[str, ConfigValue]] | None = None,
        home: str | Path,
        env: Mapping[str, str] | None = None,
        register_timeout: float = 60.0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        if node_configs is None:
            node_configs = [
                {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
            ]
        if len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node_configs for {num_nodes} nodes")
        self.app_dir = Path(app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").is_file():
            raise FileNotFoundError(f"no pyproject.toml in app_dir {self.app_dir}")
        self.num_nodes = num_nodes
        self.node_configs = [dict(c) for c in node_configs]
        self.home = Path(home).resolve()
        self.register_timeout = register_timeout
        self.address = ""
        self.node_ids: list[int] = []
        self._id = uuid.uuid4().hex
        self._env = {"FLWR_TELEMETRY_ENABLED": "0", **os.environ, **(env or {})}
        self._env["FLWR_HOME"] = str(self.home)
        path = self._env.get("PATH", os.defpath)
        self._env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
        self._env["PYTHONUNBUFFERED"] = "1"  # logs reach the files as they are written
        self._superlink: subprocess.Popen[bytes] | None = None
        self._nodes: list[subprocess.Popen[bytes]] = []
        self._runs: list[subprocess.Popen[bytes]] = []
        self._log_paths: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        """Starts the SuperLink and the SuperNodes; returns once all have registered."""
        try:
            self._start()
            self._wait_registered()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Ends every process started (SIGTERM, then SIGKILL after a grace period)."""
        self._stop()

    def _start(self) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        link_port, *node_ports = _free_ports(1 + self.num_nodes)
        self.address = f"127.0.0.1:{link_port}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        self._superlink = self._spawn(
            "superlink",
            [
                _script("flower-superlink"),
                "--insecure",
                "--host=127.0.0.1",
                f"--port={link_port}",
                "--disable-runtime-dependency-installation",
            ],
        )
        for i, (port, config) in enumerate(zip(node_ports, self.node_configs)):
            # A `--node-config` ending in ".toml" is read as a TOML file: no quoting rules.
            config_path = self.home / f"node-config-{i}.toml"
            config_path.write_text(_to_toml(config))
            # SuperNodes install no dependencies at run time unless told to.
            self._nodes.append(
                self._spawn(
                    f"supernode-{i}",
                    [
                        _script("flower-supernode"),
                        "--insecure",
                        f"--superlink={self.address}",
                        "--host=127.0.0.1",
                        f"--port={port}",
                        f"--node-config={config_path}",
                    ],
                )
            )

    def _wait_registered(self) -> None:
        """Waits until the SuperLink lists every SuperNode's id as online.

        A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink has registered and
        activated it; ``flwr supernode list`` then confirms the SuperLink's side.
        """
        deadline = time.monotonic() + self.register_timeout
        ids: list[int | None] = [None] * self.num_nodes
        while True:
            self._check_alive()
            for i in range(self.num_nodes):
                if ids[i] is None:
                    ids[i] = _node_id_in(self.home / "logs" / f"supernode-{i}.log")
            known = [x for x in ids if x is not None]
            if len(known) == self.num_nodes and set(known) <= self._online_node_ids():
                self.node_ids = known
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(known)} of {self.num_nodes} SuperNodes registered in "
                    f"{self.register_timeout} s\n{self.logs()}"
                )
            time.sleep(_POLL_S)

    def _online_node_ids(self) -> set[int]:
        """The ids of the SuperNodes the SuperLink considers online (none if it fails)."""
        result = self._flwr(["supernode", "list", CONNECTION, "--format=json"])
        if result.returncode != 0:
            return set()
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return set()
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def _check_alive(self) -> None:
        named = [("superlink", self._superlink)] + [
            (f"supernode-{i}", p) for i, p in enumerate(self._nodes)
        ]
        for name, proc in named:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}\n{self.logs()}")

    def _stop(self) -> None:
        procs = [*self._runs, *self._nodes]
        if self._superlink is not None:
            procs.append(self._superlink)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                _signal_group(proc, sig)
            _signal_marked(self._id, sig)
            deadline = time.monotonic() + _TERMINATE_GRACE_S
            while time.monotonic() < deadline and (
                any(p.poll() is None for p in procs) or _marked_pids(self._id)
            ):
                time.sleep(0.1)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_TERMINATE_GRACE_S)

    # -- runs --------------------------------------------------------------------------

    def start_run(
        self, run_config: Mapping[str, ConfigValue] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts ``flwr run <app_dir> <connection> --stream`` and returns at once.

        ``run_config`` overrides keys of the App's ``[tool.flwr.app.config]``. The
        command's stdout and stderr go to ``logs/run-<k>.out`` / ``.err`` under ``home``;
        it exits when the run has finished (or failed), or when it is killed (`__exit__`
        kills it), which does not stop the run on the SuperLink.
        """
        k = len(self._runs)
        args = [_script("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        if run_config:
            # A single `--run-config` ending in ".toml" is read as a TOML file.
            path = self.home / f"run-config-{k}.toml"
            path.write_text(_to_toml(run_config))
            args.append(f"--run-config={path}")
        proc = self._spawn(f"run-{k}", args, split_stderr=True)
        self._runs.append(proc)
        return proc

    def run(
        self,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 600.0,
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the App to its end: `wait` (with ``timeout`` and ``check``) on `start_run`.

        Raises TimeoutError, with the tail of the logs, if the run takes longer than
        ``timeout`` seconds.
        """
        return self.wait(self.start_run(run_config), timeout, check=check)

    def wait(
        self, run: subprocess.Popen[bytes], timeout: float = 600.0, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Waits for a `start_run` to end and returns what its ``flwr run`` printed.

        Args:
          run: what `start_run` returned.
          timeout: seconds to wait; past them ``flwr run`` is killed and a TimeoutError
            carries the tail of the logs.
          check: raise a RuntimeError unless ``flwr run`` exited with 0 and the
            SuperLink reports the run as ``finished:completed`` (``flwr run --stream``
            exits with 0 even when the ServerApp raised).
        """
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(run, signal.SIGKILL)
            run.wait()
            raise TimeoutError(f"flwr run did not finish in {timeout} s\n{self.logs()}") from None
        k = self._runs.index(run)
        stdout, stderr = ((self._log_dir / f"run-{k}.{ext}").read_text() for ext in ("out", "err"))
        done = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
        if check:
            status = self._run_status(done.stdout)
            if done.returncode != 0 or status != "finished:completed":
                raise RuntimeError(
                    f"flwr run exited with code {done.returncode}, run status "
                    f"{status!r}\n{self.logs()}"
                )
        return done

    def _run_status(self, run_output: str) -> str | None:
        """The SuperLink's status of the run ``flwr run`` reported starting, if any."""
        if (match := _RUN_ID_LINE.search(run_output)) is None:
            return None
        result = self._flwr(["ls", CONNECTION, f"--run-id={match[1]}", "--format=json"])
        try:
            return str(json.loads(result.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return None

    # -- failures and diagnostics ------------------------------------------------------

    def kill_node(self, i: int) -> None:
        """SIGKILLs SuperNode ``i`` with its SuperExec and the ClientApps they started.

        The SuperLink notices only when the node misses its heartbeats (about a minute
        with Flower 1.42's defaults); until then the node still counts as online.
        """
        _signal_group(self._nodes[i], signal.SIGKILL)
        _signal_marked(f"{self._id}/supernode-{i}", signal.SIGKILL)
        self._nodes[i].wait()

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each log (SuperLink, SuperNodes, ``flwr run``)."""
        parts = []
        for path in self._log_paths:
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"==> {path} <==\n{tail}")
        return "\n".join(parts)

    # -- helpers -----------------------------------------------------------------------

    @property
    def _log_dir(self) -> Path:
        return self.home / "logs"

    def _spawn(
        self, name: str, args: list[str], *, split_stderr: bool = False
    ) -> subprocess.Popen[bytes]:
        """Starts ``args`` in a new process group, its output in ``logs/<name>.*``."""
        env = {**self._env, _MARKER: f"{self._id}/{name}"}
        out = self._log_dir / (f"{name}.out" if split_stderr else f"{name}.log")
        err = self._log_dir / f"{name}.err"
        self._log_paths += [out, err] if split_stderr else [out]
        with contextlib.ExitStack() as files:  # the child keeps its own descriptors
            stdout = files.enter_context(out.open("wb"))
            stderr = files.enter_context(err.open("wb")) if split_stderr else subprocess.STDOUT
            return subprocess.Popen(
                args,
                cwd=self.home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    def _flwr(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """Runs a short ``flwr`` CLI command against the SuperLink."""
        try:
            return subprocess.run(
                [_script("flwr"), *args],
                cwd=self.home,
                env={**self._env, _MARKER: f"{self._id}/cli"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_CLI_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, -1, "", str(e))


def _script(name: str) -> str:
    """The path of a console script of this environment (or on PATH)."""
    path = Path(sysconfig.get_path("scripts")) / name
    if path.is_file():
        return str(path)
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"{name} not found: install Flower (pip install 'fedsp[flower]')")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (the OS may hand them out again)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _to_toml(config: Mapping[str, ConfigValue]) -> str:
    """``config`` as TOML: one ``"key" = value`` line per entry."""
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in config.items())


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"config values are str, int, float or bool, got {value!r}")


def _node_id_in(log: Path) -> int | None:
    """The node id a SuperNode's log reports, once registered."""
    if not log.exists():
        return None
    match = _NODE_ID_LINE.search(log.read_text(errors="replace"))
    return int(match[1]) if match else None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Sends ``sig`` to the process group ``proc`` leads, while ``proc`` runs.

    Once ``proc`` is reaped its pid may be reused; what is left of its group is found
    by `_marked_pids`.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment has ``_MARKER=marker`` or ``_MARKER=marker/...``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    exact, prefix = f"{_MARKER}={marker}".encode(), f"{_MARKER}={marker}/".encode()
    pids = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:  # a zombie's environ reads empty: it is not listed
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(v == exact or v.startswith(prefix) for v in environ.split(b"\0")):
            pids.append(int(entry.name))
    return pids


def _signal_marked(marker: str, sig: signal.Signals) -> None:
    for pid in _marked_pids(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
