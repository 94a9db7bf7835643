"""Decoding over a HookedCache: transformers' own `generate` (generate.py), the step-by-step `Stepper`
(stepper.py) for experiments that intervene between steps, and one prefill compressed under many policies
(replay.py) for budget sweeps."""

from interp_cache.decoding.replay import PrefillObservations, compress_prefilled
from interp_cache.decoding.stepper import Stepper

__all__ = ["PrefillObservations", "Stepper", "compress_prefilled"]
