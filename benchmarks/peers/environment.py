"""A peer in a virtual environment of its own (its pins conflict with this project's, or it must not be a
dependency of it), built by the benchmark itself: torch first, the version this project runs, so pip does
not fetch another build; then the peer. A script run there prints one JSON line as its last output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or run here; the message says why (it goes into the results)."""


class PeerEnvironment:
    def __init__(self, folder: str, packages: list[str]):
        self.venv = Path(__file__).resolve().parent.parent / folder
        self.packages = packages
        self.python = self.venv / "bin" / "python"

    def _ensure(self) -> None:
        if (self.venv / ".installed").exists():
            return
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        pip = [str(self.python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + self.packages, check=True)
        (self.venv / ".installed").touch()

    def run(self, script: str, *arguments: str) -> dict:
        """Run `script` (beside this file) there; its last output line, parsed as JSON."""
        try:
            self._ensure()
            done = subprocess.run([str(self.python), str(Path(__file__).with_name(script)), *arguments],
                                  capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.CalledProcessError, OSError, ValueError, IndexError) as error:
            detail = getattr(error, "stderr", "") or ""
            raise PeerUnavailable(f"{error} {detail[-400:]}") from None
