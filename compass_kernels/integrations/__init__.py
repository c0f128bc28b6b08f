"""Adapters that plug compass kernels into other libraries. Each is imported on demand
(``import compass_kernels`` imports none of them, nor the libraries they adapt):

- ``compass_kernels.integrations.transformers``: a ``"compass"`` experts implementation for
  Hugging Face transformers >= 5 (``register()``).
"""
