"""Import layering: `llava_sculpt.model` sits below `llava_sculpt.methods` and never imports it (methods register
their run formats with model/load.py instead), nor `llava_sculpt.training`; `llava_sculpt.training` never imports
the entry point `llava_sculpt.train`, which stays thin.  So there is no import circle, and every module imports
first in a fresh interpreter, and in any order."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "llava_sculpt"


def _imported_names(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement anywhere in the file (functions included) and
    of importlib.import_module / __import__ calls with a constant name."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _imports_of(folder: str, forbidden: tuple[str, ...]) -> tuple[int, list[str]]:
    """(number of files, 'path:line: name' of each import of a forbidden package) over llava_sculpt/FOLDER."""
    offending = []
    files = sorted((PACKAGE / folder).rglob("*.py"))
    for path in files:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")] + ".__init__"
        for line, name in _imported_names(ast.parse(path.read_text(), str(path)), module):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                offending.append(f"{path.relative_to(REPO)}:{line}: {name}")
    return len(files), offending


def test_model_never_imports_methods():
    count, offending = _imports_of("model", ("llava_sculpt.methods", "llava_sculpt.training"))
    assert count >= 4
    assert offending == []


def test_training_never_imports_the_entry_point():
    count, offending = _imports_of("training", ("llava_sculpt.train",))
    assert count >= 5
    assert offending == []


def test_train_entry_point_stays_thin():
    """llava_sculpt/train.py holds `main` and re-exports; the parts live in llava_sculpt/training/."""
    path = PACKAGE / "train.py"
    lines = path.read_text().splitlines()
    assert len(lines) < 150
    tree = ast.parse("\n".join(lines), str(path))
    assert [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))] == ["main"]


def test_the_checker_sees_imports_inside_functions():
    source = ("def f():\n    from llava_sculpt.methods.asymlora import x\n"
              "def g():\n    from ..methods import lora\n"
              "import importlib\nimportlib.import_module('llava_sculpt.methods.spider')\n")
    names = [n for _, n in _imported_names(ast.parse(source), "llava_sculpt.model.load")]
    assert "llava_sculpt.methods.asymlora" in names and "llava_sculpt.methods.lora" in names
    assert "llava_sculpt.methods.spider" in names


# Run in one fresh interpreter: for each module, every llava_sculpt module is dropped from sys.modules and the
# module is imported first (what a fresh interpreter importing it first does: torch, transformers and PEFT stay
# loaded, so this costs one interpreter start); then all of them in file order and in reverse order.
_SCRIPT = r"""
import importlib, json, sys, traceback

modules = json.loads(sys.argv[1])

def fresh():
    for name in [m for m in sys.modules if m == "llava_sculpt" or m.startswith("llava_sculpt.")]:
        del sys.modules[name]

failures, optional = {}, set()
for order_name, orders in [("first", [[m] for m in modules]), ("forward", [modules]), ("reverse", [modules[::-1]])]:
    for order in orders:
        fresh()
        for name in order:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name and not err.name.startswith("llava_sculpt"):  # an optional package (triton on CPU)
                    optional.add(f"{name}: {err.name}")
                    continue
                failures[f"{order_name}:{order[0]}:{name}"] = traceback.format_exc(limit=3)[-600:]
                break
            except Exception:
                failures[f"{order_name}:{order[0]}:{name}"] = traceback.format_exc(limit=3)[-600:]
                break
fresh()
import llava_sculpt.model.load
loaded_methods = sorted(m for m in sys.modules if m.startswith("llava_sculpt.methods"))
print(json.dumps({"failures": failures, "methods_after_model_load": loaded_methods, "optional": sorted(optional)}))
"""


def test_every_module_imports_first_and_in_any_order():
    modules = _modules()
    assert {"llava_sculpt.model.load", "llava_sculpt.methods.asymlora", "llava_sculpt.methods.lora_init",
            "llava_sculpt.methods.lora", "llava_sculpt.merge"} <= set(modules)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(modules)], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == {}
    # only the GPU kernel module may need a package this machine lacks
    assert all(entry.startswith("llava_sculpt.methods.cmr_triton:") for entry in result["optional"])
    assert result["methods_after_model_load"] == []  # importing model/load.py pulls in no method
