from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lwbench.errors import UnknownNameError
from lwbench.method import Method
from lwbench.registry import METHODS, TASKS, Registry


def test_builtins_are_listed_and_load():
    assert {"full", "lowres", "random"} <= set(METHODS.names())
    assert {"traffic_signs", "billiards"} <= set(TASKS.names())
    assert METHODS.get("full").name == "full"


def test_unknown_name_suggests_and_lists():
    with pytest.raises(UnknownNameError) as e:
        METHODS.get("fulll")
    msg = str(e.value)
    assert "Did you mean: full" in msg and "Known:" in msg and "random" in msg
    assert "\n" not in msg


def test_duplicate_registration_names_both_origins():
    reg = Registry("method", "lwbench.none", {})

    @reg.register("x")
    class A(Method):
        def build(self, vit):
            return vit

    class B(Method):
        def build(self, vit):
            return vit

    with pytest.raises(ValueError, match="registered twice"):
        reg.register("x")(B)
    assert reg.get("x") is A


def test_fnmatch_filter():
    assert METHODS.names("ful*") == ["full"]


def test_plugin_file_registers(tmp_path):
    plugin = tmp_path / "myplug.py"
    plugin.write_text(textwrap.dedent("""
        from lwbench.method import Method
        from lwbench.registry import register_method

        @register_method("plugfile_method")
        class P(Method):
            description = "from a file"
            def build(self, vit):
                return vit
    """))
    METHODS.load_module(str(plugin))
    assert "plugfile_method" in METHODS.names()
    assert METHODS.get("plugfile_method").description == "from a file"


def test_entry_point_plugin_installed(tmp_path):
    """A tiny third-party package installed into a temp target exposes a method via the entry-point group."""
    pkg = tmp_path / "src"
    (pkg / "lwb_demo_plugin").mkdir(parents=True)
    (pkg / "lwb_demo_plugin" / "__init__.py").write_text(textwrap.dedent("""
        from lwbench.method import Method
        class Demo(Method):
            description = "third-party demo"
            budget_key = "k"
            default_budgets = (1, 2, 3)
            def build(self, vit):
                return vit
    """))
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "lwb-demo-plugin"
        version = "0.0.1"
        [project.entry-points."lwbench.methods"]
        demo_plugin = "lwb_demo_plugin:Demo"
        [tool.setuptools]
        packages = ["lwb_demo_plugin"]
    """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), str(pkg)], check=True, capture_output=True)
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(target)!r})
        from lwbench.registry import METHODS
        c = METHODS.get("demo_plugin")
        print(c.__module__, c.name, "origin:", METHODS.origin("demo_plugin"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "lwb_demo_plugin demo_plugin" in out and "entry point" in out
    listing = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); "
                              "from lwbench.cli import main; main(['list', 'methods'])"],
                             capture_output=True, text=True, check=True).stdout
    assert "demo_plugin" in listing and "third-party demo" in listing
