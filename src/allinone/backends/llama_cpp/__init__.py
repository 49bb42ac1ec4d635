"""The llama.cpp engine: one model, one context with a unified KV cache, one loop thread.

Modules by concern: ``backend`` (the Backend: prompts, tokens, limits), ``engine_loop`` (the step
loop and the request's transitions), ``request`` (a request's state and a step's plan),
``sequences`` (sequence pools, KV reuse, the prefix cache), ``sampling`` (token choice,
log-probabilities), ``runtime`` (a typed wrapper over llama.cpp's C API), ``prompt_cache``
(finished chats in host memory).
"""

from allinone.backends.llama_cpp.backend import LlamaCppBackend

__all__ = ["LlamaCppBackend"]
