"""vLLM's V1 engine behind the language server (language.engine: vllm).

Everything above the engine (APIs, admission, pipeline stages, spans, metrics) is the same as
with the builtin engine; `VllmEngine` offers the builtin `AsyncEngine`'s `generate`. Importing this
package imports nothing of vLLM: the modules that need it are imported when the engine starts.
"""
