"""The model and its graph: loading and saving (external data, atomic writes, weight
lifetime), errors, graph helpers, shapes and shape values, opsets, legalization, and the
base every pass subclasses. The bottom room: it imports no other part of onnxsqueeze and
never runs onnxruntime."""
