"""Multi-process start-up: every host joins one JAX job through ``jax.distributed``.

tpustrat builds no cluster layer of its own. ``initialize_cluster`` is a thin, checked entry to
JAX's multi-controller runtime (the one Cloud TPU pods run on), in the spirit of TF's
``TPUClusterResolver`` plus ``initialize_tpu_system``: it finds the cluster (JAX's own detection)
or takes an explicit coordinator, joins it, and turns JAX's failures into messages a user can
act on. Afterwards ``jax.devices()`` lists every process's devices, and a strategy spans them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from tpustrat import _watchdog
from tpustrat._checks import check_int, check_seconds


class ClusterError(RuntimeError):
    """A multi-process job could not start or went wrong; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the job, as returned by ``ts.initialize_cluster``.

    Attributes:
      process_id: this process's index, in ``[0, num_processes)``; process 0 is the coordinator.
      num_processes: how many processes (hosts, usually) take part.
      coordinator_address: ``"host:port"`` of the coordinator; None for a job of one process,
        or when JAX detected the cluster itself (on a Cloud TPU pod, say).
      local_device_count: devices this process drives (its replicas' devices).
      global_device_count: devices of all processes together.
      platform: ``"tpu"``, ``"gpu"`` or ``"cpu"``.

    Example:
      >>> info = ts.initialize_cluster(num_processes=1)
      >>> info.process_id, info.num_processes, info.global_device_count
      (0, 1, 8)
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    local_device_count: int
    global_device_count: int
    platform: str


@dataclasses.dataclass(frozen=True)
class _Request:
    """The arguments of one ``initialize_cluster`` call; None where the caller gave none."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    initialization_timeout: int | None = None
    heartbeat_timeout: int | None = None
    exit_on_uncaught_exception: bool | None = None
    warn_after_waiting: float | None = None

    def settings(self) -> _Settings:
        """The options that take effect on joining, with their defaults filled in."""
        return _Settings(
            initialization_timeout=self.initialization_timeout or 300,
            heartbeat_timeout=self.heartbeat_timeout or 100,
            exit_on_uncaught_exception=bool(self.exit_on_uncaught_exception),
            warn_after_waiting=self.warn_after_waiting or 60.0,
        )


class _Settings(NamedTuple):
    initialization_timeout: int
    heartbeat_timeout: int
    exit_on_uncaught_exception: bool
    warn_after_waiting: float


_joined: tuple[_Request, ClusterInfo] | None = None

# JAX's registration deadline comes this long after the watchdog's, so that the watchdog's
# explanation is what the user reads.
_GRACE_SECONDS = 5

# How long a coordinator may take to greet a new connection (a gRPC server sends its HTTP/2
# SETTINGS frame at once); a listener silent for longer is another program.
_GREETING_SECONDS = 5

# How long a process waits for the others to publish their num_processes after joining; they
# publish before the backend starts, which waits for every process, so this is never reached
# unless a process joined with jax.distributed.initialize instead of initialize_cluster.
_PUBLISH_SECONDS = 10


def initialize_cluster(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int | None = None,
    heartbeat_timeout: int | None = None,
    exit_on_uncaught_exception: bool | None = None,
    warn_after_waiting: float | None = None,
) -> ClusterInfo:
    """Joins this process to a multi-process JAX job; call it first, on every host.

    With no arguments, JAX detects the cluster: on a Cloud TPU VM or pod slice every host
    runs the same program and finds the others by itself. Elsewhere, pass the coordinator (process
    0's ``"host:port"``), the number of processes and this process's id. ``num_processes=1``
    alone gives a job of one process without starting a coordinator, so one script serves a
    laptop and a pod. Idempotent: a later call with no arguments, or with the same ones,
    returns the same ``ClusterInfo``; a call with different ones raises ``ClusterError``.

    If the other processes do not all register within ``initialization_timeout``, JAX ends the
    process (this is not a Python exception); ``initialize_cluster`` first writes on stderr which
    process gave up, the coordinator address, and what to do. Once the job runs, a process
    that dies ends the others after ``heartbeat_timeout`` seconds. A process stopped by an
    uncaught exception normally exits as Python does: ``atexit`` handlers run (async checkpoint
    writers, loggers), then JAX's shutdown waits for the other processes, which may themselves
    be waiting for it in a collective until JAX's shutdown timeout. With
    ``exit_on_uncaught_exception=True`` such a process ends right after its traceback is printed
    (``os._exit(1)``, skipping ``atexit`` handlers), so the others stop after
    ``heartbeat_timeout``; interactive interpreters are left alone.

    Args:
      coordinator_address: ``"host:port"`` where process 0 serves the coordinator; every
        process passes the same value. Default: detected (or ``$JAX_COORDINATOR_ADDRESS``).
      num_processes: how many processes the job has. Default: detected.
      process_id: this process's index in ``[0, num_processes)``. Default: detected.
      local_device_ids: restricts this process to these local devices (GPU jobs with one
        process per device); default all of them.
      initialization_timeout: seconds to wait for every process to register (default 300).
      heartbeat_timeout: seconds of silence after which a process counts as dead (default 100).
      exit_on_uncaught_exception: in a job of several processes, end this process with
        ``os._exit(1)`` as soon as an uncaught exception's traceback is printed, without running
        ``atexit`` handlers, so that the job stops fast instead of waiting in JAX's shutdown
        (default False).
      warn_after_waiting: in a job of several processes, seconds a process may wait in
        ``run``, ``reduce``, ``gather``, a checkpoint save or the job's shutdown before it logs
        (logger ``"tpustrat"``, WARNING) which call it waits in and how many calls of each kind
        it has made, so that a call made by some processes only shows in every log (default
        60; ``float("inf")`` never warns).

    Returns:
      A ``ts.ClusterInfo`` describing this process and the job.

    Raises:
      ClusterError: the coordinator cannot be reached, its port is taken (or held by another
        program), the processes were given different ``num_processes``, JAX already started in
        this process, no cluster was detected, the TPU is held by another process, or the job
        was already initialized differently.

    Example:
      >>> info = ts.initialize_cluster(num_processes=1)  # a job of one process
      >>> ts.initialize_cluster() is info  # later calls return the same info
      True
    """
    global _joined
    request = _check_request(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids,
        initialization_timeout,
        heartbeat_timeout,
        exit_on_uncaught_exception,
        warn_after_waiting,
    )
    if _joined is not None:
        return _same_job(request, *_joined)
    settings = request.settings()
    if jax.distributed.is_initialized():
        # Someone called jax.distributed.initialize directly: describe the job JAX is in.
        info = _describe_job(request.coordinator_address)
    elif request.num_processes == 1 and request.coordinator_address is None:
        _check_tpu_not_held()
        info = _describe_job(None)
    else:
        address = _join(request, settings.initialization_timeout, settings.heartbeat_timeout)
        _check_tpu_not_held()
        info = _describe_job(address)
        _check_same_num_processes(request, info)
        if info.num_processes > 1 and settings.exit_on_uncaught_exception:
            _exit_on_uncaught_exception()
    _same_job(request, request, info)
    if info.num_processes > 1 and math.isfinite(settings.warn_after_waiting):
        _watchdog.start(info.process_id, info.num_processes, settings.warn_after_waiting)
    _joined = (request, info)
    return info


def _check_request(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_ids: Sequence[int] | None,
    initialization_timeout: int | None,
    heartbeat_timeout: int | None,
    exit_on_uncaught_exception: bool | None,
    warn_after_waiting: float | None,
) -> _Request:
    if coordinator_address is not None:
        _split_address(coordinator_address)
    if num_processes is not None:
        check_int("num_processes", num_processes, minimum=1)
    if process_id is not None:
        check_int("process_id", process_id, minimum=0)
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"process_id {process_id} is out of range for {num_processes} processes; give "
                f"each process a distinct id in [0, {num_processes})"
            )
    if local_device_ids is not None:
        if isinstance(local_device_ids, (str, bytes)) or not isinstance(local_device_ids, Sequence):
            raise TypeError(
                f"local_device_ids must be a list of device ids, got "
                f"{type(local_device_ids).__name__} {local_device_ids!r}; pass e.g. [0, 1]"
            )
        local_device_ids = tuple(local_device_ids)
        for i, device_id in enumerate(local_device_ids):
            check_int(f"local_device_ids[{i}]", device_id, minimum=0)
    if initialization_timeout is not None:
        check_seconds("initialization_timeout", initialization_timeout, whole=True)
    if heartbeat_timeout is not None:
        check_seconds("heartbeat_timeout", heartbeat_timeout, whole=True)
    if exit_on_uncaught_exception is not None and not isinstance(exit_on_uncaught_exception, bool):
        raise TypeError(
            f"exit_on_uncaught_exception must be True or False, got {exit_on_uncaught_exception!r}"
        )
    if warn_after_waiting is not None:
        check_seconds("warn_after_waiting", warn_after_waiting, whole=False)
    return _Request(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids,
        initialization_timeout,
        heartbeat_timeout,
        exit_on_uncaught_exception,
        warn_after_waiting,
    )


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+(?:%\w+)?\]")


def _split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``"host:port"`` address, or an error that says what is wrong."""
    if not isinstance(address, str):
        raise TypeError(
            f"coordinator_address must be a 'host:port' string, got {type(address).__name__} "
            f"{address!r}; use process 0's address, e.g. '10.0.0.1:8476'"
        )
    host, _, port = address.rpartition(":")
    hint = ""
    if "://" in address:
        hint = f" (drop the scheme: {address.split('://', 1)[1]!r})"
    elif host.count(":") and not host.startswith("["):
        hint = f" (write an IPv6 address in brackets: '[{host}]:{port}')"
    elif address != address.strip():
        hint = " (remove the spaces)"
    valid_port = re.fullmatch(r"[0-9]{1,5}", port) is not None and 0 < int(port) < 65536
    if hint or not valid_port or not _HOST.fullmatch(host) or not _is_ip_if_bracketed(host):
        raise ValueError(
            f"coordinator_address must be 'host:port' with a port in [1, 65535], got "
            f"{address!r}{hint}; use process 0's address, e.g. '10.0.0.1:8476'"
        )
    return host.strip("[]"), int(port)


def _is_ip_if_bracketed(host: str) -> bool:
    if not host.startswith("["):
        return True
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


def _same_job(request: _Request, first: _Request, info: ClusterInfo) -> ClusterInfo:
    """``info`` if ``request`` agrees with the job this process joined, else a ClusterError."""
    joined = {
        "coordinator_address": info.coordinator_address,
        "num_processes": info.num_processes,
        "process_id": info.process_id,
        "local_device_ids": first.local_device_ids,
        **first.settings()._asdict(),
    }
    for name, have in joined.items():
        want = getattr(request, name)
        if want is not None and want != have:
            raise ClusterError(
                f"this process already joined a job with {name}={have!r}, but this call asks "
                f"for {name}={want!r}; a process joins one job: call initialize_cluster once "
                "with the same arguments, or with none to get the current ClusterInfo"
            )
    return info


def _join(request: _Request, initialization_timeout: int, heartbeat_timeout: int) -> str | None:
    """Starts or reaches the coordinator through ``jax.distributed``; returns its address.

    The address is None when JAX detected the cluster itself: JAX has no public way to say
    which coordinator it chose.
    """
    address = request.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    who = _who(request.process_id, request.num_processes)
    start = time.monotonic()
    if address is not None and request.process_id == 0:
        _check_port_free(address, who)
    elif address is not None and request.process_id is not None:
        _wait_for_coordinator(address, who, initialization_timeout)
    remaining = max(1, round(initialization_timeout - (time.monotonic() - start)))
    watchdog = _RegistrationWatchdog(request, who, address, remaining)
    try:
        jax.distributed.initialize(
            address,
            request.num_processes,
            request.process_id,
            local_device_ids=request.local_device_ids,
            initialization_timeout=remaining + _GRACE_SECONDS,  # the watchdog speaks first
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    except RuntimeError as error:
        raise _explain(error, who, address) from error
    except ValueError as error:
        raise ClusterError(
            f"no cluster was detected and none was described ({error}): this is not a Cloud "
            "TPU VM or pod, nor a Slurm, Open MPI or Kubernetes job. Pass "
            "coordinator_address='HOST:PORT' (process 0's host), num_processes and process_id "
            "on every host, or num_processes=1 for a job of one process"
        ) from error
    finally:
        watchdog.cancel()
    if request.num_processes is not None and request.process_id is not None:
        _key_value_store().key_value_set(
            f"{_NUM_PROCESSES_KEY}{request.process_id}", str(request.num_processes)
        )
    return address


_NUM_PROCESSES_KEY = "tpustrat/num_processes/"
_DIFFERENT_COUNTS = (
    "the processes were started with different num_processes. Start every process with the "
    "same num_processes (and process ids 0 to num_processes - 1)"
)


def _key_value_store() -> Any:
    """The key-value store of the coordinator this process joined.

    JAX has no public API for it (``jax.distributed`` offers ``initialize``, ``shutdown`` and
    ``is_initialized`` only); this is the one touch of ``jax._src`` in tpustrat's start-up.
    """
    from jax._src import distributed

    return distributed.global_state.client


def _check_same_num_processes(request: _Request, info: ClusterInfo) -> None:
    """Raises a ClusterError unless every process was started with this job's num_processes.

    The coordinator runs a job of process 0's ``num_processes``; a process that was told more
    joins it all the same, and a collective would fail much later naming no one. Each process
    published its own count on joining; each reads them all.
    """
    if request.num_processes is None or request.process_id is None:
        return
    address, n = info.coordinator_address, info.num_processes
    who = f"process {request.process_id} (started with num_processes={request.num_processes})"
    if request.num_processes != n:
        raise ClusterError(
            f"{who} joined the coordinator at {address}, which runs a job of {n} processes "
            f"(process 0's num_processes): {_DIFFERENT_COUNTS}"
        )
    store, deadline = _key_value_store(), time.monotonic() + _PUBLISH_SECONDS
    published = {}
    while len(published) < n and time.monotonic() < deadline:
        published = dict(store.key_value_dir_get(_NUM_PROCESSES_KEY))
        time.sleep(0 if len(published) >= n else 0.05)
    for key, value in sorted(published.items()):
        other = key.rsplit("/", 1)[-1]
        if value != str(n):
            raise ClusterError(
                f"process {other} was started with num_processes={value}, but {who} and the "
                f"coordinator at {address} run a job of {n} processes: {_DIFFERENT_COUNTS}"
            )


def _who(process_id: int | None, num_processes: int | None) -> str:
    if process_id is None or num_processes is None:
        return "this process"
    return f"process {process_id} of {num_processes}"


def _check_port_free(address: str, who: str) -> None:
    """Raises a ClusterError if the coordinator's port is taken on this host."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
    host, port = _split_address(bind) if bind else ("", _split_address(address)[1])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ClusterError(
                f"{who} serves the coordinator at {address}, but port {port} on this host is "
                f"already in use ({error.strerror}); choose another port in "
                "coordinator_address on every host, or stop the process holding it "
                f"(`lsof -i :{port}` names it)"
            ) from None


def _wait_for_coordinator(address: str, who: str, timeout: float) -> None:
    """Waits until the coordinator answers a connection, or raises a ClusterError.

    A program other than JAX's coordinator may hold the port (a stale server, another job's
    service): JAX would wait for it the whole ``initialization_timeout``. The coordinator, a
    gRPC server, greets every connection with an HTTP/2 SETTINGS frame at once; a listener
    that stays silent, or says something else, is reported here instead.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as connection:
                _check_greeting(connection, address, who)
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"{who} could not reach the coordinator at {address} within {timeout:g} s "
                    f"({error.strerror or error}). Start the same command on every host, "
                    "process 0 (the coordinator) included; check that coordinator_address "
                    "names process 0's host and that no firewall blocks the port"
                ) from None
            time.sleep(0.2)


def _check_greeting(connection: socket.socket, address: str, who: str) -> None:
    """Raises a ClusterError unless the peer greets like a gRPC server; OSError if it hung up."""
    connection.settimeout(_GREETING_SECONDS)
    greeting = b""
    try:
        # An HTTP/2 client preface and an empty SETTINGS frame, as a gRPC client opens with.
        connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        while len(greeting) < 9:
            received = connection.recv(9 - len(greeting))
            if not received:
                raise ConnectionResetError(f"{address} closed the connection without a word")
            greeting += received
    except TimeoutError:
        pass
    if len(greeting) == 9 and greeting[3] == 0x04:  # a SETTINGS frame: an HTTP/2 server
        return
    port = _split_address(address)[1]
    said = f"answered {greeting!r}" if greeting else f"said nothing for {_GREETING_SECONDS} s"
    raise ClusterError(
        f"{who} connected to {address}, but the program listening there {said}, which JAX's "
        f"coordinator never does: the port is used by another program (an earlier job still "
        f"running, another service). Stop it (`lsof -i :{port}` on that host names it) or "
        "choose another port in coordinator_address, the same on every host"
    )


class _RegistrationWatchdog:
    """Explains on stderr, then exits, when registration outlasts ``timeout`` seconds.

    JAX aborts the process soon after its own deadline with an internal gRPC message (a C++
    abort, not a Python exception); this says first what happened in the user's terms.
    """

    def __init__(self, request: _Request, who: str, address: str | None, timeout: int):
        process_id, num_processes = request.process_id, request.num_processes
        if process_id == 0 and address is not None:
            what = f"{who} serves the coordinator at {address}"
        elif address is not None and process_id is not None:
            what = f"{who} reached the coordinator at {address}"
        else:
            what = f"{who} started joining the job"
        self._message = (
            f"tpustrat: {what}, but not every process registered within {timeout} s: the job was "
            "not started on all hosts, a host cannot reach the coordinator, or the processes "
            f"were started with different num_processes (this one: {num_processes}; the "
            "coordinator waits for process 0's count). Start the same command on every host "
            "(the same num_processes, process ids 0 to num_processes - 1), or raise "
            "initialization_timeout if some hosts start slowly. Exiting.\n"
        )
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        sys.stderr.write(self._message)
        sys.stderr.flush()
        os._exit(1)


def _explain(error: RuntimeError, who: str, address: str | None) -> ClusterError:
    text = str(error)
    if "must be called before" in text:
        return ClusterError(
            "initialize_cluster must run before JAX uses a device, but this process already "
            "did (jax.devices(), a ts.TPUStrategy, an array computation...); call "
            "initialize_cluster first thing in the program, on every host"
        )
    if "only be called once" in text:
        return ClusterError(
            "jax.distributed was already started in this process; call initialize_cluster "
            "instead of jax.distributed.initialize, once per process"
        )
    if "Failed to start RPC server" in text:
        return ClusterError(
            f"{who} could not serve the coordinator at {address}: its port is taken or the "
            "host is not an address of this machine; choose another port, or pass process 0's "
            f"own address ({text})"
        )
    return ClusterError(f"{who} could not join the job at {address}: {text}")


def _check_tpu_not_held() -> None:
    """Raises a ClusterError if libtpu is installed but another process holds the TPU.

    JAX would otherwise fall back to the CPU with a warning, and the job would fail later.
    """
    platforms = jax.config.jax_platforms  # pyrefly: ignore[missing-attribute]  # set dynamically
    if importlib.util.find_spec("libtpu") is None or (platforms and "tpu" not in platforms):
        return
    if jax.default_backend() == "tpu":
        return
    try:
        jax.devices("tpu")
    except RuntimeError as error:
        message = _tpu_held_message(str(error))
        if message:
            raise ClusterError(message) from error


def _tpu_held_message(jax_error: str) -> str | None:
    """Rewrites JAX's "TPU already in use" error for users, or None for other errors."""
    if "already in use" not in jax_error:
        return None
    return (
        "the TPU on this host is held by another process, so JAX cannot use it (JAX says: "
        f"{jax_error.strip()}). Stop that process (`sudo lsof -w /dev/accel*` or "
        "`/dev/vfio/*` lists it; often a notebook kernel or an earlier run), then start again"
    )


def _exit_on_uncaught_exception() -> None:
    """Makes an uncaught exception end this process as soon as its traceback is printed.

    Otherwise the process would wait in JAX's shutdown barrier (5 minutes by default) for
    processes that are themselves blocked in a collective, waiting for it: the whole job would
    hang. Ended, it stops sending heartbeats, and JAX stops the others after heartbeat_timeout.
    An interactive interpreter keeps its usual behaviour.
    """
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return
    previous = sys.excepthook

    def print_and_exit(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = print_and_exit


def _describe_job(address: str | None) -> ClusterInfo:
    return ClusterInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        coordinator_address=address,
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
        platform=jax.default_backend(),
    )
