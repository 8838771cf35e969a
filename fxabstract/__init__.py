"""fxabstract: compile a trained network into a smaller, faithful causal abstraction of it."""
from . import errors
from .abstraction import Abstraction, Analysis, abstract, analyse

__version__ = "0.1.0"
__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "errors"]
