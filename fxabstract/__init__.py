"""fxabstract: compile a trained network into a smaller, faithful causal abstraction of it."""
from . import errors
from .abstraction import Abstraction, Analysis, abstract, analyse
from .backend import backend
from .certify import certify
from .combine import combine
from .explain import explain
from .export import to_onnx
from .saving import load
from .verify import certificate, iia, intervene

__version__ = "0.1.0"
__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "iia", "certificate", "intervene", "to_onnx", "backend",
           "load", "certify", "combine", "explain", "errors"]
