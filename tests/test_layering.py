"""No module of src/nnqc_pipe imports against the layering of docs/architecture.md ("Layers").

Each module belongs to a layer; it may import its own layer and the layers below it, never a layer above. Every
import counts, the ones inside functions too (``ast.walk`` over the whole module).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nnqc_pipe"
# Lowest first, as in docs/architecture.md; the key is the first component under nnqc_pipe ("" = __init__).
LAYERS: list[set[str]] = [
    {"", "config", "chunks", "dice", "data"},  # the package version, config, chunks, the Dice, data handling
    {"degrade"},  # degradation (the training sampler and the saved levels)
    {"models"},  # networks, training, sampling (torch)
    {"qc"},  # metrics, scores, decisions, per-subject QC (qc/infer.py runs the models)
    {"report"},  # report tables and figures
    {"stages"},  # one entry function per rule
    {"cli", "__main__"},  # the command line
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``nnqc_pipe.qc.score`` -> ``qc``; ``nnqc_pipe`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every nnqc_pipe import in a file (``from nnqc_pipe.x import y`` counts as nnqc_pipe.x.y)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "nnqc_pipe"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nnqc_pipe":
            if node.module == "nnqc_pipe":  # from nnqc_pipe import __version__ / a subpackage
                out += [(node.lineno, f"nnqc_pipe.{a.name}" if a.name in LAYER_OF else "nnqc_pipe") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def module_name(path: Path) -> str:
    return ".".join(("nnqc_pipe", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_every_module_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LAYER_OF), f"modules without a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_no_import_against_the_layering() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, target in imported_modules(path):
            if LAYER_OF[unit_of(target)] > LAYER_OF[unit_of(importer)]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports {target}")
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from nnqc_pipe.report.tables import write_report\n")
    assert imported_modules(source) == [(2, "nnqc_pipe.report.tables")]
    assert LAYER_OF[unit_of("nnqc_pipe.report.tables")] > LAYER_OF[unit_of("nnqc_pipe.qc.score")]
