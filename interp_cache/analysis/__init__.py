"""What researchers do with a hooked run: record it (recording.py; files in recording_files.py, cost in
memory.py), align calls by absolute position (alignment.py), patch selected steps / positions / heads
(selection.py, patching.py), sweep layer x head or position (sweep.py) and draw it (pictures.py)."""
