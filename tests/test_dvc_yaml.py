"""dvc.yaml stays honest: each stage depends on every pipeline/ module it imports, and on nothing stale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
OUR_PACKAGES = ("pipeline", "lessons")
# Code that a module loads by path rather than by import: MLflow runs serving_model.py as the logged model's code.
LOADED_BY_PATH = {"pipeline/serving.py": {"pipeline/serving_model.py"}}
MNIST_YAML = yaml.safe_load((REPO / "lessons/mnist/dvc.yaml").read_text())


def module_file(module: str) -> Path:
    """pipeline.stages.train -> pipeline/stages/train.py"""
    return Path(*module.split(".")).with_suffix(".py")


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Our modules (pipeline.*, lessons.*) that `module` imports, transitively, lazy imports included."""
    seen = seen if seen is not None else set()
    if module in seen:
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((REPO / module_file(module)).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module in OUR_PACKAGES:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(tuple(f"{p}." for p in OUR_PACKAGES)):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] in OUR_PACKAGES]
        for name in names:
            if (REPO / module_file(name)).exists():
                imported_modules(name, seen)
    return seen


def stages() -> list[tuple[str, dict, str]]:
    """(name, stage, prefix of repo paths in its deps): the MNIST project lists ../../pipeline/... from its folder."""
    return [
        (f"{label}{name}", stage.get("do", stage), prefix)
        for label, pipeline, prefix in (("", DVC_YAML, ""), ("mnist:", MNIST_YAML, "../../"))
        for name, stage in pipeline["stages"].items()
    ]


def stage_module(stage: dict) -> str:
    return re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1)


@pytest.mark.parametrize("name, stage, prefix", stages(), ids=[name for name, _, _ in stages()])
def test_stage_deps_list_exactly_the_modules_it_imports(name, stage, prefix):
    files = {module_file(imported).as_posix() for imported in imported_modules(stage_module(stage))}
    files |= {extra for file in files for extra in LOADED_BY_PATH.get(file, ())}
    expected = {prefix + file for file in files}
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert listed == expected


@pytest.mark.parametrize("name, stage, prefix", stages(), ids=[name for name, _, _ in stages()])
def test_stage_deps_exist_or_are_outputs_of_other_stages(name, stage, prefix):
    base = REPO if not prefix else REPO / "lessons/mnist"
    for dep in stage["deps"]:
        if "${" not in dep and not dep.startswith(("results", "models", "data", "metrics")):
            assert (base / dep).exists(), dep


def test_variant_stages_iterate_over_the_variants_in_params():
    for pipeline in (DVC_YAML, MNIST_YAML):
        assert pipeline["stages"]["train"]["foreach"] == "${variants}"
        assert "evaluate" not in pipeline["stages"]  # compare evaluates the variants whose training changed
        assert {"variants", "evaluate", "compare"} <= set(pipeline["stages"]["compare"]["params"])


@pytest.mark.parametrize("pipeline, params", [(DVC_YAML, "params.yaml"), (MNIST_YAML, "lessons/mnist/params.yaml")])
def test_top_level_plots_overlay_every_variant(pipeline, params):
    variants = set(yaml.safe_load((REPO / params).read_text())["variants"])
    for plot in pipeline["plots"]:
        (definition,) = plot.values()
        assert {path.split("/")[1] for path in definition["y"]} == variants


def test_the_mnist_project_runs_the_root_stages_with_its_own_params_and_outputs():
    assert (REPO / "lessons/mnist/.dvc/config").exists()  # its own DVC project: the root dvc status ignores it
    for name, stage in MNIST_YAML["stages"].items():
        stage = stage.get("do", stage)
        root = DVC_YAML["stages"][name].get("do", DVC_YAML["stages"][name])
        assert stage_module(stage) == stage_module(root)
        assert stage["cmd"].startswith("cd ../.. && ") and "--params lessons/mnist/params.yaml" in stage["cmd"]
        options = lambda cmd: re.findall(r"(--[\w-]+) ", cmd.replace(" --params lessons/mnist/params.yaml", ""))
        assert options(stage["cmd"]) == options(root["cmd"]), name
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            assert not path.startswith(("..", "/")), (name, path)  # inside lessons/mnist


def test_every_stage_module_has_a_main():
    for _, stage, _ in stages():
        tree = ast.parse((REPO / module_file(stage_module(stage))).read_text())
        assert "main" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
