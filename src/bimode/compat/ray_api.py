"""Ray, as bimode starts or joins it (docs/cluster.md, docs/internals.md).

One non-public switch: a private cluster on this machine (`--ray_address local`) must listen on 127.0.0.1 only.
Ray takes its node address from the machine's network interface even when told `_node_ip_address="127.0.0.1"`,
and its servers then listen on every interface. Ray's single-machine switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
read into `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, what Ray itself sets on laptops) makes the node address
the loopback one, and every Ray server then listens there. Checked on Ray 2.60 (tests/integration/test_ray.py
lists the listening sockets).
"""

from __future__ import annotations

import os

from bimode.errors import UsageError

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray():
    """Ray and Ray Data, or a UsageError saying how to install them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time: Ray's usage report stays off
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--ray_address needs Ray: pip install 'bimode[ray]' ({exc})") from None
    return ray


def start_or_join(address: str, num_cpus: int | None = None) -> bool:
    """Start a private Ray cluster on this machine (`local`) or join one (`auto`, or an address); True when this
    call started Ray (so the caller shuts it down). A Ray already running in this process is used as it is."""
    if address == "local":
        os.environ[SINGLE_MACHINE_ENV] = "0"  # for the workers Ray spawns; set before `import ray` reads it here
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # where ray was imported before the variable was set
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def node_addresses() -> list[str]:
    """The address of every node of the Ray cluster this process is connected to."""
    import ray

    return [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
