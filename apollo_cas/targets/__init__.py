"""Restore targets: where a checkpoint's bytes go.

``flat`` (the original tool's weights.bin + weights.json), ``safetensors``
(one file or shards + index), ``tensors`` (in memory or on a GPU) and ``live``
(hot restore into running tensors).
"""
