"""dvc.yaml stays honest: each stage depends on the code that decides its outputs, and on no plumbing.

A stage's deps are its own module and every module it imports that can change what it writes (the trainer, the
model, readers, statistics). Plumbing (command line, params loading, files, tracking, logging, checkpoints,
threads) is never a dep, so editing it reruns nothing; a module reached only through plumbing is not a dep.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
OUR_PACKAGES = ("pipeline", "lessons")
PLUMBING = {
    f"pipeline.{name}"
    for name in (
        "cli", "config", "params_file", "errors", "files", "cpu", "devices", "checkpoints", "environment",
        "mlflow_runs", "tracking", "store", "serving", "serving_model", "model_card", "promotion", "executor",
    )
}  # fmt: skip
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
    if module in PLUMBING:
        return seen
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
def test_stage_deps_are_the_code_that_decides_its_outputs_and_no_plumbing(name, stage, prefix):
    modules = imported_modules(stage_module(stage)) - PLUMBING
    expected = {prefix + module_file(module).as_posix() for module in modules}
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert listed == expected


def test_tracking_and_the_store_are_no_dep_of_training_or_evaluation():
    for name in ("train", "evaluate"):
        deps = DVC_YAML["stages"][name]["do"]["deps"]
        assert not {"pipeline/tracking.py", "pipeline/store.py", "pipeline/cli.py"} & set(deps), name


@pytest.mark.parametrize("name, stage, prefix", stages(), ids=[name for name, _, _ in stages()])
def test_stage_deps_exist_or_are_outputs_of_other_stages(name, stage, prefix):
    base = REPO if not prefix else REPO / "lessons/mnist"
    for dep in stage["deps"]:
        if "${" not in dep and not dep.startswith(("results", "models", "data", "metrics", "reports")):
            assert (base / dep).exists(), dep


def test_variant_stages_iterate_over_the_variants_in_params():
    for pipeline in (DVC_YAML, MNIST_YAML):
        for name in ("train", "evaluate"):
            assert pipeline["stages"][name]["foreach"] == "${variants}"
        assert {"variants", "compare"} <= set(pipeline["stages"]["compare"]["params"])


@pytest.mark.parametrize("pipeline", [DVC_YAML, MNIST_YAML], ids=["root", "mnist"])
def test_every_variant_is_plotted_by_its_own_stages_with_no_list_to_keep(pipeline):
    """A variant added to params (or by dvc exp run -S +variants.x...) is plotted with no edit of dvc.yaml."""
    assert "plots" not in pipeline  # no top-level list of variants
    train_plots = [next(iter(plot)) for plot in pipeline["stages"]["train"]["do"]["plots"]]
    evaluate_plots = [next(iter(plot)) for plot in pipeline["stages"]["evaluate"]["do"]["plots"]]
    assert any("${key}/history.csv" in path for path in train_plots)
    assert any("confusion/${key}.json" in path for path in evaluate_plots)


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
