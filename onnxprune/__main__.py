"""``python -m onnxprune``."""

from onnxprune.cli import main

main()
