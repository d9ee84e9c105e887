"""Integrations with serving engines: code that runs inside another program.

``apollo_cas.integrations.vllm`` is a vLLM worker extension (docs/VLLM.md).
Nothing here is imported by the CLI or by ``import apollo_cas``.
"""
