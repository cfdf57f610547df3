"""Tools for testing tpustrat programs on one machine, before they meet a pod.

``run_in_local_processes`` runs a function in several local processes joined into one JAX job,
each with its own simulated CPU devices: a multi-host program, tried on a laptop or in CI.
"""

from tpustrat._launch import run_in_local_processes

__all__ = ["run_in_local_processes"]
