"""Data-aware rounding: which codes a weight matrix stores in an int format.

Round-to-nearest (``rtn``) is what :func:`~bitplan.sensitivity.formats.quantize_codes` does.
The other roundings keep the format's grid and bytes but choose the codes, scales or
zero-points with more care:

- ``gptq`` (:mod:`._gptq`): Frantar et al. 2022, second-order error compensation from the
  calibration inputs' Gram matrix;
- ``awq`` (:mod:`._awq`): Lin et al. 2023, the activation-weighted weight-clipping search (the
  per-channel scaling is not representable in the stored weights alone);
- ``hqq`` (:mod:`._hqq`): Badri & Shaji 2023, data-free half-quadratic scale/zero optimisation.

:func:`round_codes` is the entry point; :func:`layer_error` scores codes on calibration
statistics.
"""

from __future__ import annotations

from bitplan.sensitivity.rounding._api import ROUNDINGS, round_codes
from bitplan.sensitivity.rounding._errors import RoundingError
from bitplan.sensitivity.rounding._grid import concat_codes
from bitplan.sensitivity.rounding._layer_error import layer_error

__all__ = ["ROUNDINGS", "RoundingError", "concat_codes", "layer_error", "round_codes"]
