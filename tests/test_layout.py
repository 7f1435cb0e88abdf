"""The layout rules, read from the source with `ast`: stage scripts are leaves (no file imports a stage script), and
imports sit at the top of a module, except those of optional dependencies."""
import ast
import glob
import os

import pytest

from conftest import REPO

# the scripts a person runs, one per stage; tokenizer.py is a stage too, but also the shared tokenizer module
STAGES = {"pretrain", "sft", "rl", "dpo", "evaluate", "chat"}
# imported where they are used, so that picochat runs without them (the Triton kernels need triton and CUDA)
OPTIONAL = {"triton", "pyarrow", "safetensors", "kernels"}
# imports that must stay inside a function (by their full module name), and why
SHARDING = "torch's sharding engines cost about 1 s of CPU to import: only the --zero levels that use them pay it"
DEFERRED = {("common.py", "tokenizer"): "tokenizer.py imports common: at the top, each would import the other",
            ("common.py", "torch.distributed.fsdp"): SHARDING,
            ("common.py", "torch.distributed.checkpoint.state_dict"): SHARDING,
            ("model.py", "torch.distributed.optim"): SHARDING, ("model.py", "torch.distributed.tensor"): SHARDING,
            ("common.py", "torch._dynamo"): "a distributed run must import it before its process group (see there), "
                                            "and at the top it would cost every other start seconds"}
# the files that keep their imports at the top (the other data/ files and tokenizer.py are left to their owners)
TOP_IMPORTS = sorted(f"{name}.py" for name in STAGES) + ["common.py", "model.py", "data/grade.py", "data/loader.py"]


def imports(tree):
    """(node, full module name) of every import in a module; `from . import x` counts as data's."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node, node.module or "data"


def parse(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def project_files():
    files = glob.glob("*.py", root_dir=REPO) + glob.glob("data/*.py", root_dir=REPO) + glob.glob("kernels/*.py",
                                                                                                  root_dir=REPO)
    assert {"rl.py", "dpo.py", "data/grade.py", "kernels/__init__.py"} <= set(files)
    return sorted(files)


@pytest.mark.parametrize("path", project_files())
def test_no_file_imports_a_stage_script(path):
    imported = {module.split(".")[0] for _, module in imports(parse(path))}
    assert not imported & STAGES - {path[:-3]}, f"{path} imports the stage script(s) {imported & STAGES}"


@pytest.mark.parametrize("path", TOP_IMPORTS)
def test_imports_are_at_the_top(path):
    tree = parse(path)
    top = {id(node) for node in tree.body}
    deferred = [(node.lineno, module) for node, module in imports(tree)
                if id(node) not in top and module.split(".")[0] not in OPTIONAL and (path, module) not in DEFERRED]
    assert not deferred, f"{path}: imports inside functions or blocks (line, module): {deferred}"


def test_the_checks_can_fail():
    tree = ast.parse("import os\n\ndef f():\n    import rl\n    from data import grade\n")
    found = [(node.lineno, module) for node, module in imports(tree) if id(node) not in {id(n) for n in tree.body}]
    assert found == [(4, "rl"), (5, "data")] and {"rl"} & STAGES
