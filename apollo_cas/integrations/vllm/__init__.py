"""apollo_cas inside vLLM: a worker extension that saves, restores and exports weights.

``--worker-extension-cls apollo_cas.integrations.vllm.ApolloCasWorkerExtension``;
see docs/VLLM.md. The logic is in :mod:`.ops` (functions of a model and a
rank), :mod:`.collect` (which tensors) and :mod:`.periodic` (the update guard
and the background saver); :mod:`.extension` is the vLLM glue.
"""

from __future__ import annotations

from .extension import ApolloCasWorkerExtension, worker_placement

__all__ = ["ApolloCasWorkerExtension", "worker_placement"]
