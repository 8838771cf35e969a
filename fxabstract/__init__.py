"""fxabstract: compile a trained network into a smaller, faithful causal abstraction of it."""
from . import errors
from .abstraction import Abstraction, Analysis, abstract, analyse, load
from .dynamo import backend
from .interpret.combined import combine
from .interpret.explanations import explain
from .interpret.proofs import certify
from .output.onnx import to_onnx
from .verify import certificate, iia, intervene

__version__ = "0.1.0"
__all__ = ["abstract", "analyse", "Abstraction", "Analysis", "iia", "certificate", "intervene", "to_onnx", "backend",
           "load", "certify", "combine", "explain", "errors"]
