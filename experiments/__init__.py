"""jaxscale experiments: runnable training scripts and presets."""

import importlib.util
import pathlib

# jaxscale's packages are top-level names, so a user's own data.py / models.py (or a folder of that name) next to
# their script or on PYTHONPATH comes first on sys.path and hides ours: the trainers then failed deep in their imports
# with "No module named 'data.cli'" and no hint. Every sibling the experiments import must be the one beside us.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
for _name in ("models", "parallel", "data", "scaling"):
    _spec = importlib.util.find_spec(_name)
    if _spec is None:  # not installed at all: the import itself says so
        continue
    _where = [_spec.origin] if _spec.origin else list(_spec.submodule_search_locations or ())  # a folder: no origin
    if [pathlib.Path(p).resolve() for p in _where] != [_ROOT / _name / "__init__.py"]:
        raise ImportError(f"'import {_name}' finds {', '.join(map(str, _where))}, not jaxscale's {_ROOT / _name}: "
                          f"a file or folder of yours named '{_name}' (next to your script, in the working directory "
                          f"or on PYTHONPATH) hides jaxscale's package; rename it")
