"""The package's layering and module sizes (.importlinter at the repository root), checked with import-linter on
the real import graph (grimp counts imports inside functions too), and shown to catch an upward
import and a cycle when one is planted into that graph."""

import ast
import os
from pathlib import Path

import pytest
from importlinter import configuration
from importlinter.adapters.building import GraphBuilder
from importlinter.application import use_cases
from importlinter.application.app_config import settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / ".importlinter")


class _PlantingBuilder(GraphBuilder):
    """The real graph plus the given (importer, imported) edges."""

    def __init__(self, planted):
        self.planted = planted

    def build(self, *args, **kwargs):
        graph = super().build(*args, **kwargs)
        for importer, imported in self.planted:
            graph.add_import(importer=importer, imported=imported, line_number=1, line_contents="planted")
        return graph


def _broken_contracts(planted=()):
    configuration.configure()
    use_cases._register_built_in_contract_types()  # what lint_imports does before create_report
    saved = settings.copy()
    settings.configure(GRAPH_BUILDER=_PlantingBuilder(planted))
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        report = use_cases.create_report(use_cases.read_user_options(CONFIG), cache_dir=None)
    finally:
        os.chdir(cwd)
        settings.configure(**saved._config)
    return {contract.name: check for contract, check in report.get_contracts_and_checks() if not check.kept}


def _describe(broken) -> str:
    """The offending imports, one per line: file-level edges of upward routes and the imports
    import-linter would remove to break each cycle."""
    lines = []
    for name, check in broken.items():
        for dependency in check.metadata.get("invalid_dependencies", []):
            for route in dependency["routes"]:
                lines += [f"{name}: {link['importer']} -> {link['imported']} (line {link['line_numbers']})"
                          for link in route["chain"]]
        for package, breakers in check.metadata.get("cycle_breakers_by_package", {}).items():
            lines += [f"{name}: in {package}, {importer} -> {imported}" for importer, imported in sorted(breakers)]
    return "\n".join(lines)


def test_the_package_keeps_its_layering_and_has_no_cycles():
    broken = _broken_contracts()
    assert not broken, _describe(broken)


@pytest.mark.parametrize("importer, imported", [
    ("megatron_apex.models.common.config", "megatron_apex.training.loop"),
    ("megatron_apex.objectives.fm", "megatron_apex.data.sampler"),
    ("megatron_apex.checkpoint", "megatron_apex.conversion"),
    ("megatron_apex.gpu", "megatron_apex.models"),
])
def test_an_upward_import_breaks_the_layers_contract(importer, imported):
    broken = _broken_contracts([(importer, imported)])
    assert "Dependencies point down" in broken, _describe(broken)
    assert importer in str(broken["Dependencies point down"].metadata)


def test_a_cycle_inside_a_package_breaks_the_acyclic_contract():
    # data.sampler is imported by the trainer's batch code; making it import a module that
    # imports it back closes a circle inside megatron_apex.data
    broken = _broken_contracts([("megatron_apex.data.sampler", "megatron_apex.data.dataset"),
                                ("megatron_apex.data.dataset", "megatron_apex.data.sampler")])
    assert "No import cycles among the modules of any package" in broken, _describe(broken)


MAX_MODULE_LINES = 500
MAX_TRAINER_LINES = 250


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "megatron_apex").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_training_loop_class_stays_short():
    tree = ast.parse((ROOT / "megatron_apex" / "training" / "loop.py").read_text())
    trainer = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Trainer")
    lines = trainer.end_lineno - trainer.lineno + 1
    assert lines <= MAX_TRAINER_LINES, f"Trainer is {lines} lines"
