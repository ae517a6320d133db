"""The built-in passes and presets, as a fresh registry per call (no module global filled at
import time; callers extend their own copy)."""

from __future__ import annotations

from onnxsqueeze.passes.cleanup import CleanupPass
from onnxsqueeze.passes.convert_fp16 import ConvertFp16Pass
from onnxsqueeze.passes.factorize_svd import FactorizeSvdPass
from onnxsqueeze.passes.fold_constants import FoldConstantsPass
from onnxsqueeze.passes.fold_shapes import FoldShapesPass
from onnxsqueeze.passes.fuse_activations import FuseActivationsPass
from onnxsqueeze.passes.fuse_batchnorm import FuseBatchnormPass
from onnxsqueeze.passes.fuse_gemm import FuseGemmPass
from onnxsqueeze.passes.inline_ifs import InlineIfsPass
from onnxsqueeze.passes.insert_qdq import InsertQdqPass
from onnxsqueeze.passes.merge_matmuls import MergeMatmulsPass
from onnxsqueeze.passes.prune_channels import PruneChannelsPass
from onnxsqueeze.passes.prune_weights import PruneWeightsPass
from onnxsqueeze.passes.quantize_dynamic import QuantizeDynamicPass
from onnxsqueeze.passes.quantize_lstm import QuantizeLstmPass
from onnxsqueeze.passes.quantize_weights import QuantizeWeightsPass
from onnxsqueeze.passes.simplify_graph import SimplifyGraphPass
from onnxsqueeze.passes.strip_metadata import StripMetadataPass
from onnxsqueeze.pipeline.registry import PassRegistry

#: Fusions that compute the same function in another order of float operations; the
#: "exact" preset leaves them out (it keeps fuse-batchnorm in its exact-rounding mode).
REASSOCIATING = ("fuse-gemm", "fuse-activations")


def builtin_registry() -> PassRegistry:
    """A registry holding every built-in pass and the presets."""
    registry = PassRegistry()
    for cls in (
        CleanupPass,
        FoldConstantsPass,
        FoldShapesPass,
        InlineIfsPass,
        SimplifyGraphPass,
        FuseBatchnormPass,
        FuseActivationsPass,
        FuseGemmPass,
        MergeMatmulsPass,
        StripMetadataPass,
        QuantizeWeightsPass,
        InsertQdqPass,
        QuantizeDynamicPass,
        QuantizeLstmPass,
        ConvertFp16Pass,
        FactorizeSvdPass,
        PruneWeightsPass,
        PruneChannelsPass,
    ):
        registry.register(cls)
    lossless = [
        "cleanup",
        "fold-constants",
        "fold-shapes",
        "inline-ifs",
        "fold-constants",
        "fold-shapes",
        "simplify-graph",
        "fuse-batchnorm",
        "fuse-activations",
        "merge-matmuls",
        "fuse-gemm",
        "cleanup",
        "strip-metadata",
    ]
    registry.add_preset("lossless", "exact rewrites plus verified fusions", lossless)
    exact_fusions = ("fuse-batchnorm", {"reassociate": False, "rtol": 1e-6})
    exact = [
        exact_fusions if p == "fuse-batchnorm" else p for p in lossless if p not in REASSOCIATING
    ]
    registry.add_preset(
        "exact", "only rewrites that round like the original (no weight scaling)", exact
    )
    registry.add_preset("default", "what `onnxsqueeze model.onnx -o out.onnx` runs", lossless)
    return registry
