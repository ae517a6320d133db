"""The pass registry and presets, the verified pipeline (each lossless pass checked against
the model before it and rolled back if it moves outputs), and the report."""
