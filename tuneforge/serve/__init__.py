"""``tuneforge serve``: an OpenAI-compatible HTTP API for a model or a run, and ``tuneforge
monitor`` for the request log it writes.

- :mod:`.engine`: the base model and its LoRA adapters, one model id each;
- :mod:`.batcher`: the worker thread that batches concurrent requests for generation;
- :mod:`.protocol`: OpenAI request schemas (validated at the boundary) and response bodies;
- :mod:`.auth`: API keys (kept as sha256 hashes) and per-key token-bucket rate limits;
- :mod:`.metrics`: Prometheus metrics; :mod:`.requestlog`: the JSONL request log;
- :mod:`.app`: the FastAPI app that wires them; :mod:`.monitor`: summaries and plots of a log.
"""
