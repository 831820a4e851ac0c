"""The package reads as the pipeline: imports flow one way, from the simulation to the command."""

import ast
import pathlib

import smlm_tfdiff

PACKAGE = pathlib.Path(smlm_tfdiff.__file__).parent

# Stages in pipeline order; a module may import only modules of its own or an earlier stage.
# experimental/__init__ holds name tables and imports nothing: the core looks names up there.
STAGES = [
    ("seeds", "validation", "experimental"),
    ("simulation",),
    ("localization",),
    ("models.phi", "models.psi", "models"),
    ("diffusion",),
    ("uncertainty", "io", "models.training", "models.phi_training", "models.psi_training",
     "models.psi_training_jax", "pretrained"),
    ("experimental.", "serving", "flags"),
    ("analyze", "report"),
    ("demo",),
]


def _stage(module):
    """Stage index of a dotted module name below smlm_tfdiff (longest prefix wins)."""
    best, rank = "", None
    for i, names in enumerate(STAGES):
        for name in names:
            hit = (module == name.rstrip(".") if not name.endswith(".")
                   else module.startswith(name)) or module.startswith(name + ".")
            if hit and len(name) >= len(best):
                best, rank = name, i
    assert rank is not None, f"smlm_tfdiff.{module} is in no stage of tests/test_layout.py"
    return rank


def _is_module(dotted):
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def _imports(path):
    """(imported module below smlm_tfdiff, line, lazy) for every import in the file, those inside
    functions too (lazy=True), except those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "smlm_tfdiff" or node.module.startswith("smlm_tfdiff."):
                base = node.module[len("smlm_tfdiff."):] if "." in node.module else ""
                for alias in node.names:  # `from pkg import module` imports pkg.module.
                    sub = f"{base}.{alias.name}" if base else alias.name
                    names.append(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            names = [a.name[len("smlm_tfdiff."):] for a in node.names
                     if a.name.startswith("smlm_tfdiff.")]
        for name in names:
            if name:
                yield name, node.lineno, id(node) in lazy


def test_no_module_imports_a_later_stage():
    """Only experimental code may be reached from an earlier stage, and only by an import inside
    the function that runs when an experimental option is named: the default path never loads it."""
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not module:
            continue  # The package's public names (lazy) may come from anywhere.
        for target, line, lazy in _imports(path):
            hook = lazy and target.startswith("experimental.")
            if _stage(target) > _stage(module) and not hook:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "imports against the pipeline order:\n" + "\n".join(upward)


def test_the_stage_rule_sees_an_upward_import(tmp_path):
    """The checker itself: a file of the simulation stage importing analyze is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from smlm_tfdiff.analyze import run\n"
                   "from smlm_tfdiff import io\nfrom smlm_tfdiff.experimental import schedules\n")
    found = list(_imports(bad))
    assert sorted((t, lazy) for t, _, lazy in found) == [("analyze", True),
                                                          ("experimental.schedules", False),
                                                          ("io", False)]
    assert _stage("analyze") > _stage("simulation.config")
    assert _stage("experimental.schedules") > _stage("diffusion.schedule") > _stage("experimental")
