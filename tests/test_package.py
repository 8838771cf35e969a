"""The package's layout: no public name hides a submodule of the same name, at any level."""
import importlib
import pathlib
import pkgutil
import types

import fxabstract


def test_no_public_name_shadows_a_submodule():
    names = [m.name for m in pkgutil.walk_packages(fxabstract.__path__, "fxabstract.")]
    assert {"fxabstract.interpret.proofs", "fxabstract.interpret.combined", "fxabstract.interpret.explanations",
            "fxabstract.sites.heads", "fxabstract.passes.budget", "fxabstract.zoo.photos"} <= set(names)
    for name in names:
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        attr = getattr(importlib.import_module(parent), leaf, module)
        assert attr is module, f"{name} is {type(attr).__name__} on {parent}, not the submodule"
    # the documented spelling resolves (fxabstract.interpret.explanations.UnitProbe)
    import fxabstract.interpret.explanations as explanations
    assert isinstance(explanations, types.ModuleType) and hasattr(explanations, "UnitProbe")
    assert callable(fxabstract.certify) and callable(fxabstract.combine) and callable(fxabstract.explain)
    assert pathlib.Path(fxabstract.zoo.__file__).parent.name == "zoo" and hasattr(fxabstract.zoo, "mobilenet_v2")
