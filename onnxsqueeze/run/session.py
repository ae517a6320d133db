"""onnxruntime sessions from in-memory models and the choice of execution providers.

onnxruntime is imported inside the functions so that ``import onnxsqueeze`` stays fast.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxsqueeze.core.errors import (
    PipelineConfigError,
    RuntimeSessionError,
    first_line,
)
from onnxsqueeze.core.io import (
    has_external_tensors,
    initializer_bytes,
    release_weights,
    to_proto,
    weightless,
)
from onnxsqueeze.core.scratch import scratch_dir

logger = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
#: Models whose weights exceed this go to onnxruntime through a temporary directory.
INLINE_SESSION_LIMIT = 1_500_000_000


# ---------------------------------------------------------------------------- providers


def provider_name(requested: str) -> str:
    """onnxruntime's name for ``requested`` (an alias such as ``cuda``, or the name itself);
    a name neither known here nor in this onnxruntime build is a usage error."""
    import onnxruntime as ort

    name = PROVIDER_ALIASES.get(requested.lower(), requested)
    available = ort.get_available_providers()
    if name not in PROVIDER_ALIASES.values() and name not in available:
        raise PipelineConfigError(
            f"providers= '{requested}': unknown execution provider (known: "
            f"{', '.join(PROVIDER_ALIASES)}; available here: {', '.join(available)})"
        )
    return name


def short_name(provider: str) -> str:
    """``CUDAExecutionProvider`` as people write it: ``CUDA``."""
    return provider.removesuffix("ExecutionProvider")


def resolve_providers(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Map aliases to EP names and drop the unavailable ones. Returns (usable, dropped)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    names = [provider_name(p) for p in (requested or ["cpu"])]
    usable = [n for n in dict.fromkeys(names) if n in available]
    dropped = [n for n in dict.fromkeys(names) if n not in available]
    for name in dropped:
        logger.warning("execution provider %s is not available here; falling back", name)
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    prepare_gpu(usable)
    return usable, dropped


_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
_prepared: list[bool] = []


def prepare_gpu(providers: Sequence[str]) -> None:
    """Load CUDA's libraries from their pip packages (nvidia-cublas-cu13, ...) once, before
    the first GPU session: onnxruntime-gpu from pip finds them only this way
    (``onnxruntime.preload_dlls``, onnxruntime >= 1.21) unless the system has them."""
    if _prepared or not _GPU_PROVIDERS.intersection(providers):
        return
    import contextlib

    import onnxruntime as ort

    _prepared.append(True)
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):  # a system-wide CUDA needs none of this
            ort.preload_dlls()


# ---------------------------------------------------------------------------- sessions


class Session:
    """Runs an onnx_ir model: onnxruntime, or onnx.reference where asked or needed.

    ``backend="auto"`` uses onnxruntime and falls back to onnx's reference evaluator only
    when onnxruntime cannot *load* the model (old opsets it dropped, ops it lacks), so
    such models can still be verified; ``backend`` then says which one ran.
    """

    def __init__(
        self,
        model: ir.Model,
        providers: Sequence[str] | None = None,
        *,
        optimize: bool = False,
        threads: int | None = None,
        backend: str = "onnxruntime",
        prepack: bool = False,
        config: Mapping[str, str] | None = None,
    ) -> None:
        self.providers, self.dropped_providers = resolve_providers(providers)
        self.fallback_reason: str | None = None
        self._reference = None
        self._session = None
        if backend == "reference":
            self._reference = _make_reference(model)
        else:
            try:
                self._session = make_session(
                    model, session_options(optimize, threads, prepack, config), self.providers
                )
            except Exception as exc:
                message = f"onnxruntime cannot load the model: {first_line(exc)}"
                if backend != "auto":
                    raise RuntimeSessionError(message) from exc
                try:
                    self._reference = _make_reference(model)
                except Exception:
                    raise RuntimeSessionError(message) from exc
                self.fallback_reason = message
        self.backend = "onnx.reference" if self._reference is not None else "onnxruntime"
        if self._session is not None:
            self.output_names = [o.name for o in self._session.get_outputs()]
        else:
            self.output_names = [o.name or "" for o in model.graph.outputs]

    @classmethod
    def from_parts(
        cls,
        graph: bytes,
        weights: Mapping[str, np.ndarray],
        providers: Sequence[str] | None = None,
        *,
        optimize: bool = False,
        threads: int | None = None,
    ) -> Session:
        """An onnxruntime Session on a model that came as ``graph_and_weights`` (a worker's
        copy of one built elsewhere): the same options, so the same numbers."""
        self = cls.__new__(cls)
        self.providers, self.dropped_providers = resolve_providers(providers)
        self.fallback_reason, self._reference = None, None
        try:
            options = session_options(optimize, threads)
            self._session = session_from_parts(graph, weights, options, self.providers)
        except Exception as exc:
            raise RuntimeSessionError(
                f"onnxruntime cannot load the model: {first_line(exc)}"
            ) from exc
        self.backend = "onnxruntime"
        self.output_names = [o.name for o in self._session.get_outputs()]
        return self

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        runner = self._session if self._session is not None else self._reference
        try:
            values = runner.run(None, dict(feeds))
        except Exception as exc:
            raise RuntimeSessionError(
                f"{self.backend} failed to run the model: {first_line(exc)}"
            ) from exc
        return dict(zip(self.output_names, values, strict=True))

    def run_all(self, feeds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [self.run(f) for f in feeds]


def session_options(
    optimize: bool,
    threads: int | None,
    prepack: bool = False,
    config: Mapping[str, str] | None = None,
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimize:
        # Verification compares graphs, not onnxruntime's rewrites of them. Prepacking too:
        # a weight that becomes constant gets packed for MLAS, whose different summation
        # order moves results by ~1e-8 though the graph computes the same function.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def _make_reference(model: ir.Model) -> Any:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(to_proto(model))


def make_session(model: ir.Model, options: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    if takes_parts(model):
        # The weights go over as arrays, not inside the serialised model: protobuf would
        # copy each one twice (serialise, parse), onnxruntime copies them once.
        graph, detached = graph_and_weights(model)
        weights = {name: t.numpy() for name, t in detached.items()}
        return session_from_parts(graph, weights, options, providers)
    # Large or externally stored weights: write them next to a temporary model file;
    # onnxruntime maps them at creation, so the directory can go right after.
    with scratch_dir("session") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        release_weights(model)  # the copy is written: our mapped pages are not needed now
        return ort.InferenceSession(str(path), options, providers=providers)


def takes_parts(model: ir.Model) -> bool:
    """Whether ``make_session`` hands ``model`` to onnxruntime as a graph and arrays (not
    through a folder): a worker given the model decides as this process does."""
    return not has_external_tensors(model) and initializer_bytes(model) < INLINE_SESSION_LIMIT


def graph_and_weights(model: ir.Model) -> tuple[bytes, dict[str, ir.TensorProtocol]]:
    """The serialized model without its big in-memory weights, and those weights by name:
    how a session takes a model (``session_from_parts``), here or on a worker."""
    with weightless(model) as detached:
        return ir.serde.serialize_model(model).SerializeToString(), dict(detached)


def session_from_parts(
    graph: bytes, weights: Mapping[str, np.ndarray], options: Any, providers: Sequence[str]
) -> Any:
    """An onnxruntime session on ``graph_and_weights``'s parts (the arrays may be read-only
    views, such as Ray's shared memory: onnxruntime reads them where they are)."""
    import onnxruntime as ort

    if weights:
        values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in weights.values()
        ]
        options.add_external_initializers(list(weights), values)
    return ort.InferenceSession(graph, options, providers=list(providers))


#: onnxruntime's names of the float element types calibration observes.
_ORT_FLOATS = {
    "tensor(float)": ir.DataType.FLOAT,
    "tensor(float16)": ir.DataType.FLOAT16,
    "tensor(bfloat16)": ir.DataType.BFLOAT16,
    "tensor(double)": ir.DataType.DOUBLE,
}


def onnxruntime_float_types(model: ir.Model, names: Sequence[str]) -> dict[str, ir.DataType]:
    """Float element types onnxruntime gives main-graph node outputs ``names`` that onnx's
    inference leaves untyped (outputs of com.microsoft ops such as SkipLayerNormalization,
    of ai.onnx.ml ops such as Scaler): a session on a copy returning them says, unoptimized.
    Empty if it cannot load the copy."""
    clone = model.clone()
    wanted = set(names)
    outputs = [
        v
        for node in clone.graph
        for v in node.outputs
        if v.name in wanted and not v.is_graph_output()
    ]
    if not outputs:
        return {}
    for value in outputs:
        value.type, value.shape = None, None
    clone.graph.outputs.extend(outputs)
    try:
        session = make_session(
            clone, session_options(False, None, False, None), ["CPUExecutionProvider"]
        )
    except Exception:
        return {}
    found = {o.name: _ORT_FLOATS.get(o.type) for o in session.get_outputs()}
    return {name: dtype for name, dtype in found.items() if name in wanted and dtype is not None}


def crashes_onnxruntime(model: ir.Model, providers: Sequence[str] | None = None) -> str | None:
    """How onnxruntime dies loading ``model`` at its default optimizations (a signal, which
    no exception could report), tried in a child process; None if it does not crash.

    For graphs onnxruntime's optimizers meet rarely (float16 on the CPU: a fully converted
    PyTorch TransformerEncoder export segfaults onnxruntime 1.32 at level ALL), before this
    process loads one."""
    names, _ = resolve_providers(providers or ("cpu",))
    code = "import onnxruntime as o, sys; o.InferenceSession(sys.argv[1], providers=sys.argv[2:])"
    with scratch_dir("preflight") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), *names], capture_output=True, check=False
        )
    if done.returncode >= 0:
        return None
    return f"onnxruntime crashed loading it (signal {-done.returncode})"
