"""Our kernels inside other libraries' models (``onerec_fast.integrations.transformers``). Each module
imports its library lazily, so importing it without that library installed fails only on use."""
