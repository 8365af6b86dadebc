"""``python -m DeepRegistrationLib`` (what the Slicer module runs) is the ``deepreg`` command."""
from .cli import run

run()
