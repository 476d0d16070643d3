"""Method registry: built-ins, third-party entry points (a real dist-info on sys.path), duplicate names.

The entry-point package's module is the README's minimal example, so the documented contract is the tested one.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from harness import registry
from harness.compare import run_comparison
from harness.errors import MbqError
from harness.method import Method
from harness.registry import DuplicateMethodError, register_method

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README must hold the minimal plugin example after <!-- plugin-example -->"
    return match.group(1)


def make_distribution(root: Path, package: str, entry_name: str, target: str, source: str) -> None:
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(source)
    dist = root / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mbqbench.methods]\n{entry_name} = {target}\n")


@pytest.fixture
def on_sys_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("mbq_")]:
        del sys.modules[name]


def test_builtins_are_registered():
    assert {"anyprecision", "dedicated"} <= set(registry.list_methods())


def test_entry_point_method_is_discovered_and_trains(on_sys_path, tiny_spec, tmp_path):
    make_distribution(on_sys_path, "mbq_plugin_example", "joint_dorefa", "mbq_plugin_example:JointDoReFa",
                      readme_example())
    try:
        registry.discover(force=True)
        assert "joint_dorefa" in registry.list_methods()
        spec = tiny_spec(methods=("joint_dorefa", "anyprecision"), bits=(2, 8), epochs=1)
        records, table = run_comparison(spec, tmp_path / "out", show_progress=False)
        assert records[0]["method"] == "joint_dorefa" and "joint_dorefa" in table
        assert records[0]["results"]["2"]["sample_passes"] == records[0]["results"]["8"]["sample_passes"] == 192
        # the plugin quantizes exactly the sites the built-in methods do
        assert records[0]["topology"] == records[1]["topology"]
    finally:
        registry.unregister("joint_dorefa")


def test_entry_point_reusing_a_builtin_name_is_an_error(on_sys_path):
    source = textwrap.dedent("""
        from harness.method import Method
        class Impostor(Method):
            pass
    """)
    make_distribution(on_sys_path, "mbq_impostor", "anyprecision", "mbq_impostor:Impostor", source)
    with pytest.raises(DuplicateMethodError, match="registered twice"):
        registry.discover(force=True)


def test_entry_point_that_is_not_a_method_is_an_error(on_sys_path):
    make_distribution(on_sys_path, "mbq_notamethod", "broken", "mbq_notamethod:THING", "THING = 3\n")
    with pytest.raises(MbqError, match="not a Method subclass"):
        registry.discover(force=True)


def test_decorator_rejects_a_second_class_with_the_same_name():
    with pytest.raises(DuplicateMethodError):
        @register_method("anyprecision")
        class Other(Method):
            pass


PICKY_PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from harness.method_config import MethodConfig
    from harness.method import Method


    @dataclass(frozen=True)
    class PickyConfig(MethodConfig):
        level: int = 1

        def __post_init__(self):
            super().__post_init__()
            if self.level > 3:
                raise ValueError(f"level must be at most 3, got {self.level}")


    class Picky(Method):
        """A plugin whose config validates with a plain ValueError."""

        Config = PickyConfig
''')


def test_a_plugin_config_error_is_one_line_naming_the_plugin(on_sys_path, capsys):
    import cli

    make_distribution(on_sys_path, "mbq_picky", "picky", "mbq_picky:Picky", PICKY_PLUGIN)
    try:
        registry.discover(force=True)
        code = cli.run(["compare", "--methods", "picky:level=5", "--out", str(on_sys_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err == ("error: method 'picky' (mbq_picky) rejected its options: ValueError: level must "
                                     "be at most 3, got 5\n")
        assert not (on_sys_path / "out").exists()
    finally:
        registry.unregister("picky")
