"""fxabstract: compile a trained network into a smaller, faithful causal abstraction of it."""
from . import errors
from .abstraction import Abstraction, Analysis, abstract, analyse
from .dynamo import backend
from .proofs import certify
from .combined import combine
from .explanations import explain
from .export import to_onnx
from .saving import load
from .verify import certificate, iia, intervene

__version__ = "0.1.0"
__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "iia", "certificate", "intervene", "to_onnx", "backend",
           "load", "certify", "combine", "explain", "errors"]
