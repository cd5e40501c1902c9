"""bitplan: mixed-precision quantization planning.

The repository's ``app/``, ``search/``, ``sensitivity/`` and ``migrations/`` folders install as
``bitplan.app``, ``bitplan.search``, ``bitplan.sensitivity`` and ``bitplan.migrations``.
"""
