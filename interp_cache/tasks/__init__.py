"""Synthetic tasks with a known answer, for studies on the trained models: the passkey retrieval prompt."""
