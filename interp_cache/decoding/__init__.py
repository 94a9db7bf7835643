"""Decoding over a HookedCache: transformers' own `generate` (generate.py) and the step-by-step `Stepper`
(stepper.py) for experiments that intervene between steps."""

from interp_cache.decoding.stepper import Stepper

__all__ = ["Stepper"]
