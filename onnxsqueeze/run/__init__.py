"""onnxruntime: sessions and providers, user data and generated probe feeds, comparing
outputs, latency timing, constant evaluation and CPU features. Runs models; never rewrites
them."""
