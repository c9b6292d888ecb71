"""The code stays readable: small shared modules, short functions, a training script whose loop comes early, no
script importing another, and a README file table that matches the tree."""

import ast
import os
import re

from conftest import ROOT

SCRIPTS = ["make_masks.py", "make_regularisation.py", "cache_latents.py", "train_dreambooth.py", "evaluate.py",
           "rare_tokens.py"]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def shared_modules():
    return sorted(f"common/{name}" for name in os.listdir(os.path.join(ROOT, "common")) if name.endswith(".py"))


def test_the_top_level_holds_the_pipeline_steps_and_one_shared_place():
    top = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert top == sorted(SCRIPTS)
    assert os.path.isfile(os.path.join(ROOT, "common", "__init__.py"))


def test_shared_modules_are_small_and_functions_short():
    sizes = {path: len(read(path).splitlines()) for path in shared_modules()}
    assert max(sizes.values()) <= 600, sizes
    long = []
    for path in SCRIPTS + shared_modules():
        for node in ast.walk(ast.parse(read(path))):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 150:
                long.append((path, node.name, node.end_lineno - node.lineno + 1))
    assert long == []


def test_no_script_imports_another_script():
    names = {script[:-3] for script in SCRIPTS}
    for script in SCRIPTS:
        imported = set()
        for node in ast.walk(ast.parse(read(script))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & (names - {script[:-3]}), script


def test_the_training_script_reads_maths_then_the_loop_then_flags():
    source = read("train_dreambooth.py")
    lines = source.splitlines()
    tree = ast.parse(source)
    defined = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    maths = ["BatchSampler", "masked_mse", "rollout_probability", "rollout_batch", "EMA"]
    assert max(defined[name] for name in maths) < defined["run_validation"] < defined["train"] < defined["build_parser"]
    loop = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("for step in range("))
    assert defined["train"] < loop < len(lines) / 2
    # The prior-preservation block holds both its target and its weight.
    block = source[source.index("# Prior preservation"):source.index("# Forward and loss")]
    assert "args.prior_loss_weight" in block and "adapter_disabled" in block


def test_the_readme_file_table_matches_the_tree():
    readme = read("README.md")
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    for path in SCRIPTS + shared_modules():
        assert path in table or (path == "common/__init__.py" and "common/" in table), path
    for path in table:
        assert os.path.exists(os.path.join(ROOT, path.split(" ")[0])), path
