"""TF parity: the parts of tf.distribute's TPUStrategy that do nothing JAX-native.

They let code ported from TensorFlow, and tests written from TF's tests, run with few changes;
each name here is also importable from ``tpustrat`` itself. New code uses the core API given
beside each:

- ``Mirrored`` marks a value as the same on every replica (TF's mirrored values). ``run`` gives
  every replica the whole of a bare pytree and returns replicated values as plain
  ``jax.Array`` s, so the core API is the bare pytree.
- ``Topology`` says where devices sit on TF's ``[x, y, z, core]`` mesh (TF's
  ``tf.tpu.experimental.Topology``). The core API is ``jax.devices()`` (each device's
  ``coords``, ``core_on_chip`` and ``process_index``); ``ts.TPUStrategy()`` already orders them
  as ``jax.make_mesh`` does, consecutive replicas on neighbouring chips.
- ``DeviceAssignment`` fixes which device runs each replica's logical cores (TF's
  ``tf.tpu.experimental.DeviceAssignment``), for ``ts.TPUStrategy(device_assignment=...)``.
  The core API is ``ts.TPUStrategy(devices, num_logical_cores)``.

Two more TF parts sit on the strategy, where TF has them:

- ``ts.TPUStrategy(spmd=...)`` is TF's ``experimental_spmd_xla_partitioning``. JAX always
  compiles one SPMD program; ``spmd=True`` only refuses
  ``experimental_assign_to_logical_device``, as TF does. New code leaves it out.
- ``strategy.experimental_assign_to_logical_device(tensor, logical_device_id)`` is TF's
  placement of a tensor on one logical core. One SPMD program cannot keep a tensor on one core
  alone, so the tensor stays whole on every core of the replica. New code says what it means:
  ``experimental_replicate_to_logical_devices`` or ``experimental_split_to_logical_devices``.

Example:
  >>> from tpustrat import compat
  >>> strategy = ts.TPUStrategy()
  >>> float(strategy.run(lambda x: x * 2, args=(compat.Mirrored(np.float32(2.0)),)))
  4.0
  >>> float(strategy.run(lambda x: x * 2, args=(np.float32(2.0),)))  # the core API
  4.0
  >>> topology = compat.Topology.from_devices(jax.devices())
  >>> assignment = compat.DeviceAssignment.build(topology, [1, 1, 1, 2], num_replicas=4)
  >>> ts.TPUStrategy(device_assignment=assignment).mesh.devices.shape
  (4, 2)
  >>> ts.TPUStrategy(num_logical_cores=2).mesh.devices.shape  # the core API
  (4, 2)
"""

from tpustrat._topology import DeviceAssignment, Topology
from tpustrat._values import Mirrored

__all__ = ["DeviceAssignment", "Mirrored", "Topology"]
