"""The architecture's rules, checked: the runtime knows no model, the scripts hold
no per-method tables, imports form no cycle between the fine-grained modules."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PACKAGES = ("imbalanced_attr", "fgvc_gluon")


def imported_modules(path):
    """Every module a file imports (absolute names; relative ones as '.name')."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def package_files(package):
    directory = os.path.join(ROOT, package)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".py"))


@pytest.mark.parametrize("path", package_files("training_runtime"), ids=os.path.basename)
def test_the_runtime_imports_no_model_package(path):
    bad = [m for m in imported_modules(path) if m.split(".")[0] in MODEL_PACKAGES]
    assert not bad, "%s imports %s" % (path, bad)


def test_importing_the_whole_runtime_loads_no_model_package():
    modules = [os.path.basename(p)[:-3] for p in package_files("training_runtime")]
    code = ("import sys\n" + "".join("import training_runtime.%s\n" % m for m in modules if m != "__init__")
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (MODEL_PACKAGES,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_scripts_are_the_shared_main_of_their_family():
    for script, family in (("train_attr.py", "imbalanced_attr.family"), ("train_fgvc.py", "fgvc_gluon.family")):
        modules = set(imported_modules(os.path.join(ROOT, script)))
        assert modules == {family, "training_runtime"}, (script, modules)


def test_fgvc_method_modules_do_not_import_each_other():
    methods = {"baseline", "mcloss", "s3n", "center_loss"}
    for name in methods:
        imported = {m.lstrip(".").split(".")[0] for m in imported_modules(
            os.path.join(ROOT, "fgvc_gluon", name + ".py")) if m.startswith(".") or m.startswith("fgvc_gluon")}
        imported.discard("fgvc_gluon")
        assert not imported & (methods - {name}), (name, imported)
