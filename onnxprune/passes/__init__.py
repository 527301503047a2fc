"""Built-in passes, one module each; importing this package registers them all."""

from onnxprune.passes.cleanup import Cleanup
from onnxprune.passes.fold import Fold
from onnxprune.passes.fuse import Fuse
from onnxprune.passes.magnitude import Magnitude
from onnxprune.passes.refit import Refit
from onnxprune.passes.stats import Stats
from onnxprune.passes.validate import Validate
from onnxprune.passes.vote import Vote

__all__ = ["Cleanup", "Fold", "Fuse", "Magnitude", "Refit", "Stats", "Validate", "Vote"]
