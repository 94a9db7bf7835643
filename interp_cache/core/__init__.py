"""The core every family and every cache runs through: hook points that declare their layout
(`hook_layout.py`, `hook_points.py`), the state of one forward (`context.py`), the one attention core
(`attention.py`) and rotary embeddings (`rotary.py`). Nothing here knows the cache or a model family."""
