"""apollo_cas: content-addressed, deduplicating checkpoints of model weights.

The Python API mirrors the command line::

    from apollo_cas import Store

    with Store.open("/data/ckpt-store", create=True) as store:
        store.save(model.state_dict(), tag="step-1200")
        tensors = store.load("latest", device="cuda")
        store.restore("latest", "/models/served", format="safetensors")

torch is imported only by the paths that need it (loading tensors, .pt and
handles sources, the GPU path).
"""

from __future__ import annotations

from .allocator import keep_freed_memory
from .codecs import CodecPolicy
from .errors import ApolloError
from .manifest import Manifest, SaveStats, SourceInfo, TensorEntry
from .store import Checkpoint, RestoreResult, SaveResult, Store

__version__ = "0.1.0"

__all__ = [
    "ApolloError",
    "Checkpoint",
    "CodecPolicy",
    "Manifest",
    "RestoreResult",
    "SaveResult",
    "SaveStats",
    "SourceInfo",
    "Store",
    "TensorEntry",
    "__version__",
    "keep_freed_memory",
]
