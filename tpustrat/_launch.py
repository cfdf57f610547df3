"""Running a function under several local processes: a multi-host job simulated on one machine.

``run_in_local_processes(fn, 2, devices_per_process=4)`` starts two Python processes, each with
four simulated CPU devices, joins them into one JAX job (``initialize_cluster`` on a free
localhost port, CPU collectives through gloo) and returns what ``fn`` returned in each. It is
how the tests check multi-process behaviour, and how a user can try a multi-host program before
renting a pod. Every child is stopped when one fails, when the time runs out, or when the caller
is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tpustrat import _cluster
from tpustrat._checks import check_int, check_seconds

_TAIL_LINES = 30
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); from tpustrat import _launch; _launch._child_main()"
)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every child needs; pickled into a file that each child reads."""

    call: bytes  # pickle of (fn, args, kwargs), loaded after sys.path and __main__ are set up
    sys_path: list[str]
    main: tuple[str, str] | None  # ("module", name) or ("path", file) of the caller's __main__
    coordinator_address: str
    num_processes: int
    initialization_timeout: int
    heartbeat_timeout: int
    warn_after_waiting: float | None


def run_in_local_processes(
    fn: Callable[..., Any],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
    initialization_timeout: int = 60,
    heartbeat_timeout: int = 30,
    warn_after_waiting: float | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` in ``num_processes`` local processes forming one JAX job.

    Each process gets ``devices_per_process`` CPU devices and joins the job with
    ``ts.initialize_cluster`` before calling ``fn``, so inside ``fn`` ``jax.devices()`` lists every
    process's devices and ``ts.TPUStrategy()`` spans them; ``ts.initialize_cluster()`` returns the
    process's ``ClusterInfo``. An exception that escapes ``fn`` ends its process at once
    (``exit_on_uncaught_exception=True``), so that the others are stopped. ``fn`` must be importable
    by name (a module-level function; in a script, guard the script's own work with ``if __name__ ==
    "__main__":``, as with ``multiprocessing``), and ``args``, ``kwargs`` and the results must be
    picklable. JAX arrays in the results come back as numpy arrays; an array spread over several
    processes cannot be read whole by one, so return a replicated one (``strategy.reduce``,
    ``strategy.gather``) or this process's part (``strategy.experimental_local_results``).

    Args:
      fn: the function every process runs.
      num_processes: how many processes to start.
      devices_per_process: simulated CPU devices per process.
      args: positional arguments for ``fn``, the same in every process.
      kwargs: keyword arguments for ``fn``.
      timeout: seconds for the whole run; then every process is stopped.
      initialization_timeout: seconds for the processes to find each other.
      heartbeat_timeout: seconds after which JAX ends a job whose process went silent.
      warn_after_waiting: seconds a process may wait in a call the others do not make before
        it logs which (``ts.initialize_cluster``'s option; default 60).
      env: extra environment variables for the processes.

    Returns:
      ``fn``'s result in each process, indexed by process id.

    Raises:
      TypeError: ``fn``, ``args`` or ``kwargs`` cannot be sent to the processes (the message
        names which), or an argument has the wrong type.
      ClusterError: a process failed (the message names it and ends with ``fn``'s traceback
        in that process, or the end of its stderr), or the run took longer than ``timeout``
        (the message shows where each process was). Every process has been stopped when it
        is raised.

    Example:
      >>> ts.testing.run_in_local_processes(jax.device_count, 2, devices_per_process=3)
      [6, 6]
    """
    check_int("num_processes", num_processes, minimum=1)
    check_int("devices_per_process", devices_per_process, minimum=1)
    check_seconds("initialization_timeout", initialization_timeout, whole=True)
    check_seconds("heartbeat_timeout", heartbeat_timeout, whole=True)
    check_seconds("timeout", timeout, whole=False)
    if warn_after_waiting is not None:
        check_seconds("warn_after_waiting", warn_after_waiting, whole=False)
    if not callable(fn):
        raise TypeError(f"fn must be a callable, got {type(fn).__name__} {fn!r}")
    args, kwargs = _check_arguments(args, kwargs)
    job = _Job(
        call=_pickle_call(fn, args, kwargs),
        sys_path=list(sys.path),
        main=_main_module(fn),
        coordinator_address=f"127.0.0.1:{_free_port()}",
        num_processes=num_processes,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout=heartbeat_timeout,
        warn_after_waiting=warn_after_waiting,
    )
    child_env = _child_env(job.coordinator_address, devices_per_process, _check_env(env))
    with tempfile.TemporaryDirectory(prefix="tpustrat-") as tmp:
        folder = Path(tmp)
        (folder / "job.pickle").write_bytes(pickle.dumps(job))
        children: list[subprocess.Popen] = []
        try:
            for process_id in range(num_processes):
                children.append(_start(folder, process_id, child_env))
            _wait(children, folder, timeout)
            return [_result(folder, i, num_processes) for i in range(num_processes)]
        finally:
            _stop(children)


def _check_arguments(args: Any, kwargs: Any) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` as a tuple and a dict; a TypeError for any other form."""
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(
            f"args must be a tuple or list of fn's positional arguments, got "
            f"{type(args).__name__} {args!r}; for one argument write args=(value,)"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"kwargs must be a dict of keyword arguments with str keys, got "
            f"{type(kwargs).__name__} {kwargs!r}; write e.g. kwargs={{'steps': 10}}"
        )
    return tuple(args), dict(kwargs)


def _check_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a dict of str to str, got {type(env).__name__} {env!r}")
    for key, value in env.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise TypeError(
                f"env must map str to str, got {key!r}: {value!r}; environment variables are "
                f"strings: write e.g. {{{str(key)!r}: {str(value)!r}}}"
            )
    return dict(env)


def _pickle_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """The pickled call; a TypeError naming ``fn``, or the argument, that cannot be sent."""
    try:
        return pickle.dumps((fn, args, kwargs))
    except Exception:
        pass  # find which part cannot be sent, to name it
    parts = [("fn", fn), *((f"args[{i}]", a) for i, a in enumerate(args))]
    parts += [(f"kwargs[{k!r}]", v) for k, v in kwargs.items()]
    for where, value in parts:
        try:
            pickle.dumps(value)
        except Exception as error:
            if where == "fn":
                raise TypeError(
                    f"run_in_local_processes could not send fn "
                    f"{getattr(fn, '__qualname__', fn)!r} to the processes ({error}); pass a "
                    "function defined at the top level of a module (not a lambda or a nested "
                    "function), which each process imports by name"
                ) from None
            raise TypeError(
                f"run_in_local_processes could not send {where}, a {type(value).__name__}, to "
                f"the processes ({error}); pass picklable arguments (arrays, numbers, strings, "
                "top-level functions) and build the rest inside fn"
            ) from None
    return pickle.dumps((fn, args, kwargs))  # raises what made the whole fail


def _main_module(fn: Callable[..., Any]) -> tuple[str, str] | None:
    """How a child can load the caller's ``__main__`` if ``fn`` lives there."""
    if getattr(fn, "__module__", None) != "__main__":
        return None
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return ("module", spec.name)
    if getattr(main, "__file__", None):
        return ("path", os.path.abspath(main.__file__))
    raise TypeError(
        f"{fn.__qualname__} is defined in an interactive session, which the processes cannot "
        "import; define it in a module (a .py file) and import it from there"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _child_env(address: str, devices: int, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_COORDINATOR_BIND_ADDRESS=address,  # serve on the loopback interface only
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _start(folder: Path, process_id: int, env: dict[str, str]) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parent.parent)
    with (
        open(folder / f"stdout-{process_id}.txt", "wb") as stdout,
        open(folder / f"stderr-{process_id}.txt", "wb") as stderr,
    ):
        return subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(root=root), str(folder), str(process_id)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,  # its own process group, so _stop reaches its children too
        )


def _wait(children: list[subprocess.Popen], folder: Path, timeout: float) -> None:
    """Returns when every child exits 0; raises on the first failure or at the deadline.

    One thread per child waits for its exit, so failures are seen in the order they happened:
    when one process dies, the others fail soon after, and the first one is the one to report.
    """
    n, exits = len(children), queue.Queue()
    for i, child in enumerate(children):
        threading.Thread(target=lambda i=i, c=child: exits.put((i, c.wait())), daemon=True).start()
    deadline, succeeded = time.monotonic() + timeout, 0
    while succeeded < n:
        try:
            process_id, code = exits.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            running = [i for i, child in enumerate(children) if child.poll() is None]
            for i in running:  # ask for Python stacks (faulthandler) before stopping them
                _signal(children[i], signal.SIGUSR1)
            time.sleep(1.0)
            _stop(children)
            stacks = "\n".join(f"--- process {i}:\n{_tail(folder, i)}" for i in running)
            raise _cluster.ClusterError(
                f"run_in_local_processes timed out after {timeout:g} s with processes {running} "
                f"of {n} still running (stopped now); raise timeout if the work is just slow. "
                f"Where they were:\n{stacks}"
            ) from None
        if code == 0:
            succeeded += 1
            continue
        running = [i for i, child in enumerate(children) if child.poll() is None]
        _stop(children)
        stopped = f"; processes {running} were still running and were stopped" if running else ""
        raised = folder / f"error-{process_id}.txt"
        if raised.exists():
            where = f"Its traceback:\n{raised.read_text(errors='replace').rstrip()}"
        else:
            where = f"The last lines of its stderr:\n{_tail(folder, process_id)}"
        raise _cluster.ClusterError(
            f"process {process_id} of {n} {_describe_exit(code)}{stopped}. {where}"
        )


def _result(folder: Path, process_id: int, n: int) -> Any:
    path = folder / f"result-{process_id}.pickle"
    if not path.exists():
        raise _cluster.ClusterError(
            f"process {process_id} of {n} exited with code 0 but returned nothing: fn ended the "
            "process itself (sys.exit or os._exit); return from fn instead"
        )
    return pickle.loads(path.read_bytes())


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"failed with exit code {code}"


def _tail(folder: Path, process_id: int) -> str:
    """The end of a child's stderr, without C++ stack frames and gloo's connection notices."""
    text = (folder / f"stderr-{process_id}.txt").read_text(errors="replace")
    lines = [
        line
        for line in text.splitlines()
        if not re.match(r"\s*@\s+0x|\[Gloo\]", line) and line.strip()
    ]
    return "\n".join(lines[-_TAIL_LINES:]) or "(empty)"


def _signal(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has exited already
        os.killpg(child.pid, signum)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            _signal(child, signal.SIGKILL)
    for child in children:
        child.wait()


def _child_main() -> None:
    """A child's whole life: load the job, join the cluster, run ``fn``, save its result.

    An exception on the way is written whole to ``error-<process id>.txt`` for the parent's
    message, then raised as usual (its traceback goes to stderr too).
    """
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    folder, process_id = Path(sys.argv[1]), int(sys.argv[2])
    try:
        _child_work(folder, process_id)
    except Exception:
        (folder / f"error-{process_id}.txt").write_text(traceback.format_exc())
        raise


def _child_work(folder: Path, process_id: int) -> None:
    job: _Job = pickle.loads((folder / "job.pickle").read_bytes())
    sys.path[:] = job.sys_path + [p for p in sys.path if p not in job.sys_path]
    if job.main is not None:
        _load_main(*job.main)
    fn, args, kwargs = pickle.loads(job.call)
    _cluster.initialize_cluster(
        job.coordinator_address,
        job.num_processes,
        process_id,
        initialization_timeout=job.initialization_timeout,
        heartbeat_timeout=job.heartbeat_timeout,
        exit_on_uncaught_exception=True,  # a failed fn ends its process at once
        warn_after_waiting=job.warn_after_waiting,
    )
    result = _to_host(fn(*args, **kwargs), process_id)
    try:
        data = pickle.dumps(result)
    except Exception as error:
        raise TypeError(
            f"process {process_id} could not send back what fn returned, a "
            f"{type(result).__name__} ({error}); return picklable values (arrays, numbers, "
            "strings, lists and dicts of them)"
        ) from None
    partial = folder / f"result-{process_id}.partial"
    partial.write_bytes(data)
    partial.rename(folder / f"result-{process_id}.pickle")


def _load_main(kind: str, where: str) -> None:
    """Loads the caller's ``__main__`` as ``__mp_main__``, as ``multiprocessing`` does."""
    import runpy
    import types

    module = types.ModuleType("__mp_main__")
    if kind == "module":
        namespace = runpy.run_module(where, run_name="__mp_main__", alter_sys=False)
    else:
        namespace = runpy.run_path(where, run_name="__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _to_host(result: Any, process_id: int) -> Any:
    def fetch(path, leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable or leaf.is_fully_replicated:
            return np.asarray(leaf)
        raise TypeError(
            f"process {process_id} returned a jax.Array at result{jax.tree_util.keystr(path)} "
            "that is spread over several processes, so no process can read it whole; return "
            "strategy.reduce(...) or strategy.gather(...) (replicated), or this process's "
            "strategy.experimental_local_results(...)"
        )

    return jax.tree_util.tree_map_with_path(fetch, result)
