"""The package layout's rules: the core imports no model library, PEFT or Fabric and no other arcvit package;
nothing imports in a circle; light commands load no PEFT; every registered block spec is exercised."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import arcvit
from arcvit.core.specs import registered_block_specs

SRC = Path(arcvit.__file__).parent
# every package may use these (docs/architecture.md)
SHARED = ("arcvit.errors", "arcvit.extras", "arcvit.fileio", "arcvit.numbers")
CORE_MAY_IMPORT = ("arcvit.core", *SHARED, "arcvit")  # "arcvit": __version__ only
FORBIDDEN_IN_CORE = ("timm", "transformers", "peft", "lightning_fabric", "lightning", "optuna", "fastapi")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_core_imports_no_library_and_no_other_arcvit_package():
    core = sorted((SRC / "core").glob("*.py"))
    assert core
    for path in core:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_CORE, f"{path.name} imports {name}"
            if top == "arcvit":
                assert name in CORE_MAY_IMPORT or name.startswith("arcvit.core."), f"{path.name} imports {name}"


def test_shared_modules_import_no_other_arcvit_module():
    """Any package may use errors, extras, fileio and numbers, so they may use nothing of arcvit but each other."""
    for module in SHARED:
        path = SRC / f"{module.split('.')[1]}.py"
        assert {n for n in _imports(path) if n.split(".")[0] == "arcvit"} <= set(SHARED), path.name


def test_no_circular_imports_between_packages():
    """Package-level dependency graph (arcvit.<package>) has no cycle."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        source = _module(path).split(".")[1] if "." in _module(path) else "arcvit"
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "arcvit" and len(parts) > 1 and parts[1] != source and (SRC / parts[1]).is_dir():
                graph.setdefault(source, set()).add(parts[1])
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("argv", [["--help"], ["report", "{tmp}"]])
def test_light_commands_do_not_import_peft(argv, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = ("import sys\nfrom arcvit.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('peft', 'optuna', 'transformers', 'onnx', 'onnxruntime', 'tensorflow_datasets', 'ray', 'psycopg') if m in sys.modules]\nprint('HEAVY', heavy)") % argv
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


EXPORT_MAY_IMPORT = ("arcvit.core", "arcvit.data", "arcvit.export", *SHARED, "arcvit")
EXPORT_EDGE = ("onnx", "onnxscript", "onnxruntime")


def test_export_builds_on_core_and_data_and_imports_onnx_only_at_its_edge():
    """export/ is serving's neighbour: serving may run its files, so it never imports serving (nor cli, bench,
    training); onnx, onnxscript and onnxruntime are imported in export/runtime.py only, and only when used."""
    files = sorted((SRC / "export").glob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            if name.split(".")[0] == "arcvit":
                assert name == "arcvit" or name.startswith(EXPORT_MAY_IMPORT), f"export/{path.name} imports {name}"
            assert name.split(".")[0] not in EXPORT_EDGE, f"export/{path.name} imports {name} (use export.runtime)"
    runtime = (SRC / "export" / "runtime.py").read_text()
    assert "require(name, " in runtime and "import onnx" not in runtime


def test_every_registered_block_spec_is_exercised_by_the_family_tests():
    """tests/test_arc.py builds one model per timm family; each spec's block type must appear in one of them."""
    from test_arc import FAMILIES, build  # noqa: E402  (the family tests' own model builders)
    seen = {type(m) for family in FAMILIES for m in build(family).modules()}
    timm_specs = [s for s in registered_block_specs() if s.name.startswith("timm.")]
    assert {s.name for s in timm_specs} == {"timm.vit", "timm.beit", "timm.eva", "timm.swin"}
    for spec in timm_specs:
        assert any(issubclass(t, spec.block_types) for t in seen), f"{spec.name} is not exercised"


HUB_MAY_IMPORT = ("arcvit.core", "arcvit.backends", "arcvit.export", "arcvit.hub", *SHARED, "arcvit")


def test_hub_builds_on_core_and_imports_huggingface_hub_only_inside_functions():
    """hub/ is read by cli and serving, so it imports neither (nor training, bench, data); huggingface_hub is
    imported inside the functions that call it, never when the module loads."""
    files = sorted((SRC / "hub").glob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            if name.split(".")[0] == "arcvit":
                assert name == "arcvit" or name.startswith(HUB_MAY_IMPORT), f"hub/{path.name} imports {name}"
        top_level = {n.module if isinstance(n, ast.ImportFrom) else a.name
                     for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))
                     for a in getattr(n, "names", [])}
        assert not any(str(m).startswith("huggingface_hub") for m in top_level), path.name
