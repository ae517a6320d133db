"""The Ray cluster of a run: started for it (``workers``) or joined (``address``).

A local cluster lives as long as the run: started before the lossless passes (its worker
processes import the engine while this process folds constants), shut down when the run
ends, whatever happens. A joined cluster is left running. Ray's own log lines stay out of
the user's terminal; its errors become one-line ``SqueezeError``s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxsqueeze.core.errors import SqueezeError, first_line
from onnxsqueeze.core.optional import require
from onnxsqueeze.distributed import calibration, runs
from onnxsqueeze.run.workers import check_size

logger = logging.getLogger(__name__)


class RayWorkers:
    """``run.workers.Workers`` on a Ray cluster: ``size`` pieces of work at once, each
    worker holding ``threads`` of the cluster's CPUs (its histogram threads; onnxruntime
    keeps its default threads everywhere, so the numbers are the driver's)."""

    def __init__(self, ray: Any, size: int, threads: int, started_s: float, address: str) -> None:
        self.ray = ray
        self.size = size
        self.threads = threads
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.util.get_node_ip_address()
        #: Every node is this machine (several raylets may be; its files are the workers'):
        #: see distributed.shipping.
        self.local = all(n["NodeManagerAddress"] == here for n in nodes)
        #: The nodes with CPUs, where ``placed`` deals long pieces of work.
        self.node_ids = [n["NodeID"] for n in nodes if n["Resources"].get("CPU")]
        self._nodes: set[str] = set()
        #: The warm-up tasks started with the pool (runs.warm_up), not waited for.
        self.warming: list[Any] = []
        #: What the report says of the pool: where, how big, its start-up time, what ran.
        self.record: dict[str, Any] = {
            "backend": "ray",
            "address": address,
            "workers": size,
            "threads_per_worker": threads,
            "startup_s": round(started_s, 2),
            "nodes": "this machine" if self.local else "several machines",
        }

    def run_models(
        self,
        models: Iterable[ir.Model],
        feeds: Sequence[Mapping[str, Any]],
        providers: Sequence[str],
        optimize: bool,
    ) -> Iterator[list[dict[str, Any]]]:
        return runs.run_models(self, models, feeds, providers, optimize)

    def calibrate(self, model: ir.Model, source: Any, options: Any, samples: int | None) -> Any:
        return calibration.sharded(self, model, source, options, samples)

    def placed(self, index: int) -> Any:
        """Where piece ``index`` of a long, evenly cut piece of work (a calibration shard)
        should run: dealt round the nodes, each keeping its memory and CPUs for one (Ray's
        default would pile short-lived ones onto the driver's node); anywhere if that
        node is full or gone. Ray's default on a cluster of one node."""
        if len(self.node_ids) < 2:
            return "DEFAULT"
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.node_ids[index % len(self.node_ids)]
        return NodeAffinitySchedulingStrategy(node, soft=True)

    def count(self, key: str, amount: int = 1) -> None:
        """Tally work sent to the pool for the report (models run, shards calibrated)."""
        self.record[key] = self.record.get(key, 0) + amount

    def seen(self, whereabouts: tuple[int, str]) -> None:
        """A worker's peak memory and its node, as it reported them with a result."""
        rss, node = whereabouts
        peak = max(self.record.get("worker_peak_mib", 0), round(rss / 2**20))
        self.record["worker_peak_mib"] = peak
        self._nodes.add(node)
        self.record["nodes_used"] = len(self._nodes)


#: Seconds to wait for a cluster's head to answer before saying it is not there (Ray
#: itself retries for minutes).
CONNECT_TIMEOUT = 10.0


def reachable(address: str) -> None:
    """A ``host:port`` (or ``ray://host:port``) address whose head does not answer is a
    one-line error now, not minutes of Ray's retries. ``auto`` and other forms are Ray's."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise SqueezeError(
            f"ray_address= {address}: no Ray cluster answers there ({first_line(exc)})"
        ) from None


@contextlib.contextmanager
def pool(workers: int | None = None, address: str | None = None) -> Iterator[RayWorkers]:
    """A Ray pool for the block: a local cluster of ``workers`` CPUs, or the cluster at
    ``address`` (``workers`` then caps how many of its CPUs one run takes)."""
    check_size(workers)
    ray = require("ray", "ray", "workers= (Ray)")
    if address:
        reachable(address)
    start = time.perf_counter()
    with _LOCK:  # two runs in two threads share one cluster; the last one out stops it
        if not ray.is_initialized():
            _start(ray, workers, address)
            _OWNED[0] = True
        _OWNED[1] += 1
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        size = max(1, min(workers or cpus, cpus))
        threads = max(1, cpus // size) if not address else 1
        label = address or f"local ({cpus} CPUs)"
        pool = RayWorkers(ray, size, threads, time.perf_counter() - start, label)
        runs.warm_up(pool)
        yield pool
    finally:
        with _LOCK:
            _OWNED[1] -= 1
            if _OWNED[1] == 0 and _OWNED[0]:
                ray.shutdown()
                _OWNED[0] = False


#: Whether this process started the running cluster, and how many runs use it.
_OWNED: list = [False, 0]
_LOCK = threading.Lock()


def _start(ray: Any, workers: int | None, address: str | None) -> None:
    settings: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    try:
        if address:
            ray.init(address=address, **settings)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **settings)
    except Exception as exc:
        where = f"at {address}" if address else "on this machine"
        raise SqueezeError(f"cannot start Ray {where}: {first_line(exc)}") from exc
