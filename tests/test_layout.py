"""The code stays readable: small shared modules, short functions with few parameters, a training script whose loop
comes early and that composes the training step itself, one file per model family (no name comparisons outside
it), no script importing another, and a README file table that matches the tree. Structure is read with `ast`,
never from the wording of a comment."""

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
    found = []
    for folder in ("common", "common/families"):
        found += [f"{folder}/{name}" for name in os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py")]
    return sorted(found)


def functions(path):
    return [node for node in ast.walk(ast.parse(read(path))) if isinstance(node, ast.FunctionDef)]


def calls(node):
    """The dotted names called inside `node` ("adapters.adapter_disabled", "masked_mse", "objective.loss_weights")."""
    return {ast.unparse(call.func) for call in ast.walk(node) if isinstance(call, ast.Call)}


def test_the_top_level_holds_the_pipeline_steps_and_one_shared_place():
    top = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert top == sorted(SCRIPTS)
    assert os.path.isfile(os.path.join(ROOT, "common", "__init__.py"))


def test_shared_modules_are_small_and_functions_short_with_few_parameters():
    sizes = {path: len(read(path).splitlines()) for path in shared_modules()}
    assert max(sizes.values()) <= 600, sizes
    long, wide = [], []
    for path in SCRIPTS + shared_modules():
        for node in functions(path):
            if node.end_lineno - node.lineno + 1 > 150:
                long.append((path, node.name, node.end_lineno - node.lineno + 1))
            parameters = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                          if a.arg not in ("self", "cls")]
            if len(parameters) > 6:
                wide.append((path, node.name, len(parameters)))
    assert long == [] and wide == []


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


def test_the_training_script_reads_maths_then_the_step_then_the_loop_then_flags():
    source = read("train_dreambooth.py")
    tree = ast.parse(source)
    defined = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    maths = ["BatchSampler", "masked_mse", "rollout_probability", "rollout_batch", "EMA"]
    order = [defined[name].lineno for name in ("training_loss", "Validator", "train", "build_parser")]
    assert max(defined[name].lineno for name in maths) < order[0] and order == sorted(order)
    loop = next(node for node in ast.walk(defined["train"]) if isinstance(node, ast.For)
                and ast.unparse(node.iter).startswith("range(first_step"))
    assert loop.lineno < len(source.splitlines()) / 2


def test_the_training_step_is_composed_in_the_training_script():
    """Masked loss, both prior targets, DOP's rows, the rollout target and the weights: training_loss composes them
    (the objective's small interface aside); no shared module switches the adapter off for a target or weighs the
    prior or DOP terms."""
    step = next(node for node in ast.parse(read("train_dreambooth.py")).body
                if isinstance(node, ast.FunctionDef) and node.name == "training_loss")
    called = calls(step)
    assert {"adapters.adapter_disabled", "masked_mse", "objective.loss_weights", "objective.target", "rollout_batch",
            "dop_caption", "info.predict"} <= called
    read_flags = {ast.unparse(node) for node in ast.walk(step) if isinstance(node, ast.Attribute)}
    assert {"args.prior_loss_weight", "args.dop_weight", "args.prior_loss_target"} <= read_flags
    for path in shared_modules():
        if path != "common/adapters.py":
            assert not any(name.endswith("adapter_disabled") for node in functions(path) for name in calls(node)), path


def family_name_comparisons(path, names):
    """Comparisons in `path` with a family's name (a string literal that names one) or with an object's .family."""
    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(set(), *(literals(element) for element in node.elts))
        return set()

    found = []
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(literals(side) & names for side in sides) or any(
                    isinstance(side, ast.Attribute) and side.attr == "family" for side in sides):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_family_folder_compares_a_family_name():
    from common import families

    outside = SCRIPTS + [path for path in shared_modules() if not path.startswith("common/families/")]
    assert [hit for path in outside for hit in family_name_comparisons(path, set(families.BY_NAME))] == []


def test_the_family_folder_documents_every_family_of_its_registry():
    from common import families

    doc = families.__doc__
    for family in families.REGISTRY:
        assert os.path.basename(family.__module__.replace(".", "/")) + ".py" in doc, family
        assert family.family and family.title and family.pipeline and family.modelspec and family.hub_tag


def test_the_readme_file_table_matches_the_tree():
    readme = read("README.md")
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    for path in SCRIPTS + shared_modules():
        assert path in table or (path.endswith("__init__.py") and path.rsplit("/", 1)[0] + "/" in table), path
    for path in table:
        assert os.path.exists(os.path.join(ROOT, path.split(" ")[0])), path
