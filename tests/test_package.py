"""The package's layout: no public name hides a submodule of the same name."""
import importlib
import pathlib
import types

import fxabstract


def test_no_public_name_shadows_a_submodule():
    root = pathlib.Path(fxabstract.__file__).parent
    names = [p.stem for p in root.glob("*.py") if p.stem != "__init__"] + ["passes"]
    assert {"proofs", "combined", "explanations"} <= set(names)
    for name in names:
        module = importlib.import_module(f"fxabstract.{name}")
        attr = getattr(fxabstract, name, module)
        assert attr is module, f"fxabstract.{name} is {type(attr).__name__}, not the submodule"
    # the documented spelling resolves (README: fxabstract.explanations.UnitProbe)
    import fxabstract.explanations as explanations
    assert isinstance(explanations, types.ModuleType) and hasattr(explanations, "UnitProbe")
    assert callable(fxabstract.certify) and callable(fxabstract.combine) and callable(fxabstract.explain)
