"""quantize-weights: weight-only int8/int4 for MatMul/Gemm, Conv(Transpose), Einsum, RNNs, Gather.

Activations stay float and the file shrinks about 4x (int8) or 8x (int4). Lossy: the pipeline
reports how far outputs moved instead of rolling the pass back. Forms:

- ``fold``: codes and scales expanded by ``Cast -> Mul`` (int4: unpacked by float ops), all
  constant, so the runtime folds them back to the float weight at load (onnxsqueeze.quant.unpack):
  float speed and memory, a small file, any opset from 6.
- ``dq``: ``DequantizeLinear(q, scale)`` feeding the unchanged op; per output channel for int8
  (opset >= 13), block-wise or int4 at opset 21. onnxruntime keeps these DQ nodes for its QDQ
  fusions and, with float activations, dequantizes on every run (MiniLM int8: 0.35x fp32).
- ``matmulnbits``: onnxruntime's ``com.microsoft.MatMulNBits`` (blocks along K) and
  ``GatherBlockQuantized`` for tables, which keep n-bit weights in memory. ``auto``: ``dq``
  where the opset allows, else these at 4 bits.

Rounding (onnxsqueeze.quant.gptq.WeightRounder): ``mse`` scales minimise each block's squared
error, ``rtn`` is max scaling (``auto``: mse at 4 bits, rtn at 8); with ``grams`` (X^T X of a
MatMul's input on calibration data) that weight is rounded by GPTQ instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnxsqueeze.calib.gram import conv_key
from onnxsqueeze.core.graphs import (
    GraphLike,
    all_value_names,
    float_weight,
    is_constant,
    read_elsewhere,
    scopes,
)
from onnxsqueeze.core.io import count_nodes
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.spill import after_each_field, forget_replaced
from onnxsqueeze.quant.gptq import WeightRounder
from onnxsqueeze.quant.nbits import NBitsBuilder
from onnxsqueeze.quant.qmath import ROUNDINGS
from onnxsqueeze.quant.unpack import MIN_OPSET, SLICE_OPSET, can_unpack
from onnxsqueeze.quant.weight_store import WeightStore

FORMATS = ("auto", "dq", "matmulnbits", "fold", "mixed")
WEIGHT_OPS = ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose", "Einsum", "LSTM", "GRU", "RNN")
#: onnxruntime contrib ops and their weight inputs (fold form only: their kernels take no
#: DequantizeLinear): an onnxruntime-optimized transformer's attention and embedding tables.
CONTRIB_WEIGHTS = {"Attention": (1,), "FusedMatMul": (1,), "EmbedLayerNormalization": (2, 3, 4)}
#: MatMulNBits needs a block; this is what onnxruntime's own int4 quantizer defaults to.
DEFAULT_NBITS_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsOptions:
    bits: int = 8
    #: Rows of K per scale; 0 = one scale per output channel.
    block_size: int = 0
    format: str = "auto"
    #: Weights with fewer elements stay float (their bytes do not matter, their error might).
    min_elements: int = 4096
    #: auto | rtn | mse (see the module docstring)
    rounding: str = "auto"
    #: activation name -> X^T X on calibration data: its MatMul's weight gets GPTQ rounding
    grams: Mapping[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, metadata={"hidden": True}
    )
    exclude_nodes: tuple[str, ...] = ()
    #: (node, bits, block) -> (q, scales), kept by a caller that builds many variants
    memo: dict | None = dataclasses.field(default=None, compare=False, metadata={"hidden": True})
    after_each: Callable[[ir.Model], None] | None = after_each_field()


class QuantizeWeightsPass(SqueezePass):
    """Constant MatMul/Gemm/Conv(Transpose)/Einsum/RNN weights and Gather tables -> int8/int4."""

    name = "quantize-weights"
    summary = (
        "weight-only int8/int4 of MatMul/Gemm/Conv(Transpose)/Einsum/RNN weights, Gather tables"
    )
    lossless = False
    Options = QuantizeWeightsOptions

    def call(self, model: ir.Model) -> SqueezeResult:
        opts: QuantizeWeightsOptions = self.options
        if opts.bits not in (4, 8):
            raise ValueError(f"quantize-weights.bits must be 4 or 8, got {opts.bits}")
        if opts.format not in FORMATS:
            raise ValueError(f"quantize-weights.format must be one of {', '.join(FORMATS)}")
        if opts.rounding not in ("auto", *ROUNDINGS):
            raise ValueError(f"quantize-weights.rounding must be auto, {', '.join(ROUNDINGS)}")
        if opts.block_size and (opts.block_size < 16 or opts.block_size & (opts.block_size - 1)):
            raise ValueError("quantize-weights.block_size must be 0 or a power of two >= 16")
        self._model = model
        self._names = all_value_names(model)
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._rounder = WeightRounder(opts.rounding, opts.grams, opts.memo)
        stats: dict = dict(bytes_before=0, bytes_after=0, skipped=0, quantized=[], kept_float={})
        for scope in list(scopes(model)):
            for node in list(scope):
                if node.name in opts.exclude_nodes:
                    stats["kept_float"][node.name] = "excluded"
                    continue
                weights = [v for v in node.inputs if v is not None and v.const_value is not None]
                outcome = self._quantize(scope, node)
                forget_replaced(weights, streaming=opts.after_each is not None)
                if outcome is None or outcome == (0, 0):
                    stats["skipped"] += outcome is not None  # a candidate left alone
                    continue
                stats["quantized"].append(node.name)
                stats["bytes_before"] += outcome[0]
                stats["bytes_after"] += outcome[1]
                if opts.after_each is not None:
                    opts.after_each(model)
        stats["weights_quantized"] = len(stats["quantized"])
        stats.update(nodes=count_nodes(model), gptq=self._rounder.gptq)
        return SqueezeResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    def _form(self) -> str | None:
        opts: QuantizeWeightsOptions = self.options
        if opts.format == "mixed":  # integer where onnxruntime runs it so, folded elsewhere
            matmul = self._op in ("MatMul", "Gemm", "Gather") and not (self._half or self._contrib)
            return (
                "dq"
                if matmul and self._opset >= 13
                else ("fold" if self._opset >= MIN_OPSET else None)
            )
        if opts.format == "fold" or self._half or self._contrib:  # the fold form only
            return "fold" if self._opset >= MIN_OPSET and opts.format in ("auto", "fold") else None
        dq_opset = 21 if (opts.bits == 4 or opts.block_size) else 13
        if opts.format == "dq":
            return "dq" if self._opset >= dq_opset else None
        if opts.format == "matmulnbits":
            return "matmulnbits"
        if self._opset >= dq_opset:
            return "dq"
        return "matmulnbits" if opts.bits == 4 else None

    def _quantize(self, scope: GraphLike, node: ir.Node) -> tuple[int, int] | None:
        """(bytes before, bytes after) if the node's weight was quantized, (0, 0) if it was a
        candidate left alone, None if not a candidate."""
        self._contrib = node.domain == "com.microsoft" and node.op_type in CONTRIB_WEIGHTS
        self._op = node.op_type
        if not self._contrib and (
            node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS
        ):
            return None
        self._half = bool(node.outputs) and node.outputs[0].dtype == ir.DataType.FLOAT16
        if node.op_type == "Gather":
            return self._quantize_table(scope, node)
        if node.op_type in ("Conv", "ConvTranspose", "Einsum"):  # Einsum: its constant operand
            return self._quantize_filters(scope, node, None if node.op_type == "Einsum" else 1)
        if node.op_type in ("LSTM", "GRU", "RNN", "EmbedLayerNormalization"):  # (0, 0) + (x, y)
            indices = CONTRIB_WEIGHTS.get(node.op_type, (1, 2))  # W and R; the three tables
            done = [o for o in (self._quantize_filters(scope, node, i) for i in indices) if o]
            return (sum(o[0] for o in done), sum(o[1] for o in done)) if done else None
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return None
        weight_value = node.inputs[1]
        weight = float_weight(weight_value)
        if weight is None or weight.ndim != 2:
            return None
        if weight.size < self.options.min_elements:
            return None
        readers = [user for user, _ in weight_value.uses()]
        if read_elsewhere(weight_value, node) and not self._shared(scope, readers):
            return (0, 0)
        attr = node.attributes.get("transB") if node.op_type in ("Gemm", "FusedMatMul") else None
        trans_b = bool(attr.as_int()) if attr is not None else False
        form = self._form()
        nbits = form == "matmulnbits"  # one MatMulNBits per MatMul: a shared weight stays float
        if form is None or (nbits and (node.op_type != "MatMul" or len(readers) > 1)):
            return (0, 0)
        kn = weight.T if trans_b else weight  # [K, N]
        if form == "matmulnbits":
            return self._to_nbits(scope, node, kn)
        return self._to_dq(scope, node, kn, trans_b)

    def _quantize_table(self, scope: GraphLike, node: ir.Node) -> tuple[int, int] | None:
        """An embedding table read by Gather(axis 0): one scale per row (or per block of a
        row). As DequantizeLinear the whole table is dequantized on every run (MiniLM: see
        docs/benchmarks/weights.md); GatherBlockQuantized dequantizes only the rows read."""
        axis = node.attributes.get("axis")
        table = float_weight(node.inputs[0])
        if table is None or table.ndim != 2:
            return None
        if (axis is not None and axis.as_int() != 0) or table.size < self.options.min_elements:
            return None
        if read_elsewhere(node.inputs[0], node):
            return (0, 0)
        form = self._form()
        if form == "matmulnbits":
            if table.shape[1] % 2 and self.options.bits == 4:
                return (0, 0)  # two 4-bit values per byte along a row
            return self._to_nbits(scope, node, table.T)
        if form not in ("dq", "fold"):
            return (0, 0)
        return self._to_dq(scope, node, table.T, trans_b=True, index=0)

    def _shared(self, scope: GraphLike, readers: list[ir.Node]) -> bool:
        """Whether a weight several MatMul/Gemm of this graph read (an unrolled RNN's), none kept
        float, is quantized once for all of them (WeightStore replaces every use)."""
        excluded = self.options.exclude_nodes
        return all(r.graph is scope and r.op_type in ("MatMul", "Gemm") and r.name not in excluded
                   for r in readers)  # fmt: skip

    def _round(self, node: ir.Node, kn: np.ndarray, bits: int, block: int, index: int = 1):
        """(q, scales) of a [K, N] weight (input ``index``, a memo key of its own): GPTQ where
        the node's input has a Gram matrix (a shared weight's readers': their sum)."""
        key = node.inputs[0].name if node.op_type in ("MatMul", "Gemm") else None
        readers = [u.inputs[0].name for u, _ in node.inputs[1].uses()] if key else []
        key = tuple(readers) if len(readers) > 1 else key
        key = conv_key(node) if node.op_type == "Conv" else key
        name = (node.name or "") + (f"#{index}" if node.name and index != 1 else "")
        return self._rounder.round(name, key, kn, bits, block)

    def _to_nbits(self, scope: GraphLike, node: ir.Node, kn: np.ndarray) -> tuple[int, int]:
        """MatMulNBits (blocks along K), or GatherBlockQuantized for a table (``kn``: its T)."""
        bits, block = self.options.bits, self.options.block_size or DEFAULT_NBITS_BLOCK
        q, scales = self._round(node, kn, bits, block)
        builder = NBitsBuilder(self._model, self._names, bits, block)
        if node.op_type == "Gather":
            return kn.nbytes, builder.gather(scope, node, q.T, scales.T)
        return kn.nbytes, builder.matmul(scope, node, q, scales)

    def _to_dq(
        self, scope: GraphLike, node: ir.Node, kn: np.ndarray, trans_b: bool, index: int = 1
    ) -> tuple[int, int]:
        opts: QuantizeWeightsOptions = self.options
        if self._cannot_fold(kn, opts.block_size):
            return (0, 0)
        q, scales = self._round(node, kn, opts.bits, opts.block_size)
        if trans_b:
            q, scales = q.T, scales.T  # [N, K] and [N, blocks]
        if opts.block_size:
            attributes = {"axis": 1 if trans_b else 0, "block_size": opts.block_size}
        else:
            scales = scales.reshape(-1)
            attributes = {"axis": 0 if trans_b else 1}
        return self._insert_dq(scope, node, index, q, scales, attributes)

    def _quantize_filters(
        self, scope: GraphLike, node: ir.Node, index: int | None = 1
    ) -> tuple[int, int] | None:
        """Conv filters [M, C, k...], a scale per output channel, or in the fold form per block
        along channels x kernel (the convolution stays float: a heavy-tailed input, as
        magika's, needs no 8-bit range); LSTM/GRU/RNN W or R [directions, gates x hidden,
        size], a scale per row; ConvTranspose filters and an Einsum's constant operand (index
        None: the first) per row of their first axis. All but Conv: fold form only."""
        recurrent = node.op_type in ("LSTM", "GRU", "RNN")
        if index is None:
            constant = [i for i, v in enumerate(node.inputs) if v is not None and is_constant(v)]
            index = constant[0] if constant else len(node.inputs)
        weight = float_weight(node.inputs[index]) if len(node.inputs) > index else None
        if weight is None or weight.ndim < (3 if node.op_type in ("Conv", "ConvTranspose") else 2):
            return None
        if weight.size < self.options.min_elements or (recurrent and weight.ndim != 3):
            return None
        if read_elsewhere(node.inputs[index], node):
            return (0, 0)
        form = self._form()
        dq_ok = node.op_type == "Conv" and self._opset >= (21 if self.options.bits == 4 else 13)
        if form != "fold" and not dq_ok:
            return (0, 0)  # per-axis DequantizeLinear (int4: opset 21)
        m = weight.shape[0] * (weight.shape[1] if recurrent else 1)
        kn = weight.reshape(m, -1).T
        block = self.options.block_size if form == "fold" and not recurrent else 0
        if block and kn.shape[0] % block and self._opset < SLICE_OPSET:
            block = 0  # per output channel rather than float
        if form is None or self._cannot_fold(kn, block):
            return (0, 0)
        q, scales = self._round(node, kn, self.options.bits, block, index)
        if block:  # [M, K] codes by blocks of K, reshaped to the filters after scaling
            attributes = {"axis": 1, "block_size": block}
            args = (q.T, scales.T, attributes, weight.shape)
            return self._insert_dq(scope, node, index, *args)
        args = (scales.reshape(m), {"axis": 0})
        if recurrent:  # rows [M, size], reshaped to the weight after scaling
            return self._insert_dq(scope, node, index, q.T, *args, weight.shape)
        return self._insert_dq(scope, node, index, q.T.reshape(weight.shape), *args)

    def _cannot_fold(self, kn: np.ndarray, block: int) -> bool:
        """In the fold form a partial last block along K is padded and sliced off (Slice
        with inputs: opset 10), and int4 codes must pair into bytes (checked before the costly
        rounding)."""
        if self._form() != "fold":
            return False
        if block and kn.shape[0] % block:
            return self._opset < SLICE_OPSET
        return not can_unpack(kn, self.options.bits)

    def _insert_dq(self, scope, node, index, q, scales, attributes, shape=None) -> tuple[int, int]:
        """Input ``index`` of ``node`` becomes DequantizeLinear(q, scales), or its fold form."""
        fold = self._form() == "fold"
        store = WeightStore(self._model, self._names, self.options.bits, fold, self._half)
        return store.replace(scope, node, index, q, scales, attributes, shape)
