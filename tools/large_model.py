"""A generated fp32 transformer of a chosen size, its weights written straight to an external
data file (generating a 4 GB model holds one weight in memory, not the model).

Each block: LayerNormalization, Q/K/V MatMuls, multi-head attention (Reshape, Transpose,
MatMul, Softmax, MatMul), the output projection, a residual Add, LayerNormalization, a
4x FFN with Gelu (Erf form) and a residual Add. Weights are seeded normal / sqrt(fan-in),
so activations stay in range through every block.

    python tools/large_model.py OUT.onnx --hidden 1664 --blocks 32   # about 4.25 GB
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh

HEAD_SIZE = 64


def build(path: Path, hidden: int, blocks: int, seed: int = 0) -> int:
    """Write the model to ``path`` (+ ``path.data``); returns the weight bytes."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits = [], []
    offset = 0
    heads = hidden // HEAD_SIZE
    with open(path.with_name(data_name), "wb") as data:

        def weight(name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
            nonlocal offset
            if scale is None:
                array = (rng.standard_normal(shape, np.float32) / math.sqrt(shape[0])).astype(
                    np.float32
                )
            else:
                array = np.full(shape, scale, np.float32)
            raw = array.tobytes()
            data.write(raw)
            tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=shape)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", len(raw))):
                tensor.external_data.add(key=key, value=str(value))
            inits.append(tensor)
            offset += len(raw)
            return name

        def const(name: str, values: list[int]) -> str:
            inits.append(oh.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values))
            return name

        split = const("split_heads", [0, 0, heads, HEAD_SIZE])
        merge = const("merge_heads", [0, 0, hidden])
        inits.append(oh.make_tensor("inv_sqrt_d", onnx.TensorProto.FLOAT, [], [HEAD_SIZE**-0.5]))
        inits.append(oh.make_tensor("sqrt_half", onnx.TensorProto.FLOAT, [], [0.5**0.5]))
        inits.append(oh.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0]))
        inits.append(oh.make_tensor("half", onnx.TensorProto.FLOAT, [], [0.5]))
        x = "x"
        for b in range(blocks):
            p = f"b{b}_"

            def n(op, ins, outs, **attrs):
                nodes.append(oh.make_node(op, ins, outs, name=outs[0], **attrs))
                return outs[0]

            ln = n("LayerNormalization", [x, weight(p + "ln1_g", (hidden,), 1.0),
                   weight(p + "ln1_b", (hidden,), 0.0)], [p + "ln1"], axis=-1)  # fmt: skip
            qkv = []
            for part in "qkv":
                mm = n(
                    "MatMul", [ln, weight(p + part + "_w", (hidden, hidden))], [p + part + "_mm"]
                )
                r = n("Reshape", [mm, split], [p + part + "_r"])
                perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]
                qkv.append(n("Transpose", [r], [p + part + "_t"], perm=perm))
            scores = n("MatMul", [qkv[0], qkv[1]], [p + "scores"])
            scaled = n("Mul", [scores, "inv_sqrt_d"], [p + "scaled"])
            probs = n("Softmax", [scaled], [p + "probs"], axis=-1)
            ctx = n("MatMul", [probs, qkv[2]], [p + "ctx"])
            ctx_t = n("Transpose", [ctx], [p + "ctx_t"], perm=[0, 2, 1, 3])
            merged = n("Reshape", [ctx_t, merge], [p + "merged"])
            proj = n("MatMul", [merged, weight(p + "o_w", (hidden, hidden))], [p + "proj"])
            res1 = n("Add", [x, proj], [p + "res1"])
            ln2 = n("LayerNormalization", [res1, weight(p + "ln2_g", (hidden,), 1.0),
                    weight(p + "ln2_b", (hidden,), 0.0)], [p + "ln2"], axis=-1)  # fmt: skip
            up = n("MatMul", [ln2, weight(p + "up_w", (hidden, 4 * hidden))], [p + "up"])
            erf_in = n("Mul", [up, "sqrt_half"], [p + "erf_in"])
            erf = n("Erf", [erf_in], [p + "erf"])
            erf1 = n("Add", [erf, "one"], [p + "erf1"])
            gate = n("Mul", [up, erf1], [p + "gate"])
            gelu = n("Mul", [gate, "half"], [p + "gelu"])
            down = n("MatMul", [gelu, weight(p + "down_w", (4 * hidden, hidden))], [p + "down"])
            x = n("Add", [res1, down], [p + "out"])
    nodes.append(oh.make_node("Identity", [x], ["y"], name="output"))
    graph = oh.make_graph(
        nodes,
        "large_transformer",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--hidden", type=int, default=1664)
    parser.add_argument("--blocks", type=int, default=32)
    args = parser.parse_args()
    size = build(args.output, args.hidden, args.blocks)
    print(f"{args.output}: {size / 2**30:.2f} GiB of weights")


if __name__ == "__main__":
    main()
