"""Models: `HookedModel` (the wrapper, hooked_model.py), `load` (zoo, local checkpoint or hub name,
loading.py), the built-in zoo of tiny models (zoo.py) and the offline byte tokenizer (tokenizer.py)."""
