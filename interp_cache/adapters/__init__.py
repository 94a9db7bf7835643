"""Family adapters: one file per family (or group of families sharing an attention layout), each declaring
its `FAMILIES` -- adapter, transformers model_type and zoo config -- which `registry.py` reads."""
