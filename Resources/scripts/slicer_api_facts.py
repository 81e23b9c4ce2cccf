"""Record the Slicer APIs the modules rely on, per Slicer branch, into Testing/slicer_api_facts.json.

    python Resources/scripts/slicer_api_facts.py SLICER_GIT_DIR SLICERPYTORCH_GIT_DIR [branches...]

Reads the sources with ``git show`` (a bare clone is enough; default branches: 5.10 5.12 main) and writes
the names the static checks in Testing/test_slicer_api_versions.py compare the module code against:
slicer.util functions, slicer.packaging functions (and pip_ensure's parameters), SampleData's module
functions and SampleDataLogic methods (and registerCustomSampleDataSource's parameters), the Python-visible
names of slicer.app (Q_PROPERTY and methods of qSlicerCoreApplication / qSlicerApplication), the widget
classes that parameterNodeWrapper can bind, and PyTorchUtilsLogic of SlicerPyTorch.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "Testing" / "slicer_api_facts.json"


def show(repo: str, ref: str, path: str) -> str | None:
    proc = subprocess.run(["git", "--git-dir", repo, "show", f"{ref}:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def ls(repo: str, ref: str) -> list:
    proc = subprocess.run(["git", "--git-dir", repo, "ls-tree", "-r", "--name-only", ref], capture_output=True,
                          text=True, check=True)
    return proc.stdout.splitlines()


def top_level(source: str) -> list:
    return sorted({n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
                  | {t.id for n in ast.parse(source).body if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)})


def methods(source: str, cls: str) -> dict:
    """{method: [parameter names]} of a class."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs]
                    for f in node.body if isinstance(f, ast.FunctionDef)}
    return {}


def function_params(source: str, name: str) -> list:
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return [a.arg for a in node.args.args + node.args.kwonlyargs]
    return []


def header_names(text: str) -> list:
    """Q_PROPERTY and method names of the headers, plus PythonQt decorators (static_<Class>_<name>, or
    <name>(<Class>* self)) that add Python-only names such as slicer.app.testingEnabled()."""
    props = re.findall(r"Q_PROPERTY\(\s*[\w:<>*]+\s+(\w+)", text)
    calls = re.findall(r"^\s*(?:Q_INVOKABLE\s+)?(?:static\s+|virtual\s+)*[\w:<>*&]+[\s*&]+(\w+)\s*\(", text, re.M)
    decorated = re.findall(r"static_qSlicer(?:Core)?Application_(\w+)\s*\(", text)
    decorated += re.findall(r"\b(\w+)\s*\(\s*qSlicer(?:Core)?Application\s*\*", text)
    return sorted(set(props) | set(calls) | set(decorated))


def slicer_facts(repo: str, ref: str) -> dict:
    files = ls(repo, ref)
    util = show(repo, ref, "Base/Python/slicer/util.py")
    packaging = show(repo, ref, "Base/Python/slicer/packaging.py")
    sample = show(repo, ref, "Modules/Scripted/SampleData/SampleData.py")
    app = "".join(show(repo, ref, p) or "" for p in ("Base/QTCore/qSlicerCoreApplication.h",
                                                    "Base/QTGUI/qSlicerApplication.h",
                                                    "Base/QTCore/qSlicerBaseQTCorePythonQtDecorators.h",
                                                    "Base/QTGUI/qSlicerBaseQTGUIPythonQtDecorators.h"))
    connectors = set()
    for path in files:
        if path.endswith("parameterNodeWrapper/guiConnectors.py"):
            connectors |= {c.split(".")[-1] for c in re.findall(r"type\(widget\)\s*==\s*([\w.]+)", show(repo, ref, path))}
    logic = methods(sample, "SampleDataLogic")
    return {
        "util": top_level(util),
        "packaging": top_level(packaging) if packaging else None,
        "pip_ensure_params": function_params(packaging, "pip_ensure") if packaging else None,
        "sampledata_module": top_level(sample),
        "sampledata_logic": sorted(logic),
        "register_source_params": logic.get("registerCustomSampleDataSource", []),
        "app": header_names(app),
        "gui_connector_widgets": sorted(connectors),
    }


def pytorch_facts(repo: str) -> dict:
    source = show(repo, "HEAD", "PyTorchUtils/PyTorchUtils.py")
    logic = methods(source, "PyTorchUtilsLogic")
    body = source.split("def installTorch", 1)[1].split("\n  def ", 1)[0]
    return {"logic": sorted(logic), "installTorch_params": logic.get("installTorch", []),
            "installTorch_imports_torch": "import torch" in body}


def main(slicer_repo: str, pytorch_repo: str, *branches) -> None:
    branches = branches or ("5.10", "5.12", "main")
    facts = {"source": "Slicer/Slicer branches and fepegar/SlicerPyTorch HEAD, read by slicer_api_facts.py",
             "slicer": {b: slicer_facts(slicer_repo, b) for b in branches},
             "pytorchutils": pytorch_facts(pytorch_repo)}
    OUT.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({', '.join(branches)})")


if __name__ == "__main__":
    main(*sys.argv[1:])
