"""Structure discovery: which hidden units a graph has, and how each folds away.

`find_sites(gm)` returns every eligible site and, for every other layer, the reason it is not one.
The records are in `site.py`, the layer and op table in `layers.py`, the finder in `find.py`, and each
site kind beyond a plain path (attention heads, splits, squeeze-and-excitation) is one module listed
in the pattern table, `patterns.py`.
"""
from .find import annotate_shapes, find_sites, tied_modules
from .layers import dense_weight, groups_of, regroup
from .patterns import PATTERNS
from .site import Context, Piece, Refusal, SharedPiece, Site

__all__ = ["PATTERNS", "Context", "Piece", "Refusal", "SharedPiece", "Site", "annotate_shapes", "dense_weight",
           "find_sites", "groups_of", "regroup", "tied_modules"]
