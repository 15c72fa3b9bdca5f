"""One worker node of ``tests.isolated_cluster``, run in its own mount namespace: ``python -m tests.isolated_node
GCS_ADDRESS``. Started as Ray's own ``cluster_utils`` starts a node: ``ray start --address`` refuses to join while
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every port on 127.0.0.1."""
import signal
import sys

from ray._private.node import Node
from ray._private.parameter import RayParams

params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0,
                   object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0,
                   include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.pause()
