"""onnxsqueeze's graph-rewriting passes (installed as ``onnxsqueeze.passes``): one rewrite per
module, each a ``core.pass_base.SqueezePass``. The registry and presets that name them live
in ``onnxsqueeze.pipeline.presets``."""
