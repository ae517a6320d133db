"""Scale-out on Ray (the ``[ray]`` extra): calibration sharded over actors and the budget
search's candidate models measured in parallel, with the same results as one process.

``pool(workers, address)`` starts a local Ray cluster of ``workers`` CPUs for a run (or
joins the cluster at ``address``) and gives the stages a ``run.workers.Workers`` that sends
work there. Nothing here is needed by a run in one process.
"""

from onnxsqueeze.distributed.cluster import RayWorkers, pool

__all__ = ["RayWorkers", "pool"]
