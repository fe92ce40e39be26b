"""The package namespace: lazy submodules, public names, no TensorFlow on import."""

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import funmatch_keras as fm

_ROOT = Path(__file__).resolve().parents[1]


def _run_jax(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter on the JAX backend, package importable."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          cwd=_ROOT, capture_output=True, text=True, timeout=300)


def test_import_does_not_load_tensorflow():
    pytest.importorskip("jax")
    result = _run_jax("""
        import funmatch_keras, sys
        from funmatch_keras import Distiller, models
        assert 'tensorflow' not in sys.modules
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_models_distiller_optim_do_not_load_tensorflow():
    # What benchmarks/gpu_check.py needs on a machine without TensorFlow.
    pytest.importorskip("jax")
    result = _run_jax("""
        import sys
        import funmatch_keras as fm
        import funmatch_keras.distiller, funmatch_keras.models, funmatch_keras.optim.optimizers
        assert fm.DistillationKL is fm.losses.DistillationKL
        assert callable(fm.models.bit_r50x1) and callable(fm.models.load_timm_bit)
        loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')
        assert not loaded, loaded[:5]
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def _eager_imports() -> dict[str, tuple[str, str]]:
    """What `funmatch_keras/__init__.py` imports for static analyzers (its
    `if TYPE_CHECKING:` block): public name -> (module, attribute or None)."""
    import ast

    tree = ast.parse((_PACKAGE / "__init__.py").read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    return {alias.asname or alias.name: (node.module, alias.name)
            for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


def test_public_names_are_what_static_analyzers_see():
    assert fm.__version__ == "0.1.0"
    assert sorted(fm.data.MODES) == [
        "consistent", "fixed_teacher", "function_matching", "independent"]
    eager = _eager_imports()
    assert set(fm.__all__) <= set(eager), set(fm.__all__) - set(eager)
    for name in fm.__all__:
        module, attribute = eager[name]
        try:  # `from funmatch_keras.data import augment` names a submodule
            expected = importlib.import_module(f"{module}.{attribute}")
        except ModuleNotFoundError:  # `from funmatch_keras.losses import DistillationKL`
            expected = getattr(importlib.import_module(module), attribute)
        assert getattr(fm, name) is expected, name
        assert name in dir(fm)
    assert fm.Distiller.__module__ == "funmatch_keras.distiller"
    assert fm.train.__name__ == "funmatch_keras.app.distill"


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_thing"):
        fm.no_such_thing  # noqa: B018


# -- the architecture (README, "What is in the box") ---------------------------
_PACKAGE = _ROOT / "funmatch_keras"
# The layers above the library: nothing in the library imports them.
_ABOVE_THE_LIBRARY = ("funmatch_keras.app", "funmatch_keras.configs")


def _module_name(path) -> str:
    parts = path.relative_to(_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    """`(dotted name, path)` of every module of the package."""
    return [(_module_name(path), path) for path in sorted(_PACKAGE.rglob("*.py"))]


def _imports(source: str, known: set[str]) -> set[str]:
    """The package's modules that `source` imports (outside `if TYPE_CHECKING:`)."""
    import ast

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
                continue
            yield node
            yield from walk(ast.iter_child_nodes(node))

    found = set()
    for node in walk(ast.parse(source).body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("funmatch_keras")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and \
                (node.module or "").startswith("funmatch_keras"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = dict(_modules())
    return {name: _imports(path.read_text(), set(modules)) - {name}
            for name, path in modules.items()}


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} imports {target}" for name, targets in sorted(graph.items())
            if name != "funmatch_keras" and not name.startswith(_ABOVE_THE_LIBRARY)
            for target in sorted(targets) if target.startswith(_ABOVE_THE_LIBRARY)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_top_level_holds_few_modules():
    top = sorted(p.name for p in _PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_every_module_has_a_one_line_job():
    # The measure is the job, not the length: no line limit.
    for _, path in _modules():
        first = path.read_text().lstrip().splitlines()[0]
        assert first.lstrip("r").startswith('"""') and len(first) > 10, (path, first)


def test_the_library_never_imports_the_app_or_the_configs():
    graph = _import_graph()
    assert not _layer_violations(graph), _layer_violations(graph)
    # The check itself: a library module that imported the app would be named.
    graph["funmatch_keras.data.views"] = graph["funmatch_keras.data.views"] | {
        "funmatch_keras.app.build"}
    assert _layer_violations(graph) == [
        "funmatch_keras.data.views imports funmatch_keras.app.build"]


def test_no_import_cycles_between_modules():
    graph = _import_graph()
    assert not _cycles(graph), _cycles(graph)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_readme_module_map_names_every_module_by_its_folder():
    listed = set()
    for line in (_ROOT / "README.md").read_text().splitlines():
        if line.startswith("| ") and "`funmatch_keras" in line.split("|")[1]:
            listed |= set(re.findall(r"`(funmatch_keras[\w.]*)`", line.split("|")[1]))
    # A dataset's config file (one `get_config` each) is listed by its folder.
    missing = {name for name, path in _modules()
               if "def get_config(" not in path.read_text()} - listed
    assert not missing, f"modules missing from the README's module map: {sorted(missing)}"


# -- the design notes (docs/design.md) ------------------------------------------
_DESIGN = _ROOT / "docs" / "design.md"
_CITATION = re.compile(r"docs/design\.md`?\s*§\s*(\d+(?:\.\d+)?)")
_STALE_CITATION = re.compile(r"DESIGN\s*§|shared/DESIGN")


def _cited_files():
    """README.md and every text file under the code, test, benchmark and example folders."""
    readme = _ROOT / "README.md"
    yield readme, readme.read_text(encoding="utf-8")
    for folder in ("funmatch_keras", "tests", "benchmarks", "examples"):
        for path in sorted((_ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                try:
                    yield path, path.read_text(encoding="utf-8")
                except UnicodeDecodeError:  # an image or other binary file
                    continue


def _design_sections():
    """The section numbers of docs/design.md's headings (`## 2. ...` → "2", `### 2.4 ...`)."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", _DESIGN.read_text(), re.MULTILINE))


def test_design_citations_name_sections_of_docs_design_md():
    sections = _design_sections()
    assert {"2", "3", "4", "5", "2.4", "4.2"} <= sections, sorted(sections)
    stale, unknown, cited = [], [], 0
    for path, text in _cited_files():
        if path == Path(__file__).resolve():
            continue
        name = path.relative_to(_ROOT)
        stale += [f"{name}: {m.group()!r}" for m in _STALE_CITATION.finditer(text)]
        for match in _CITATION.finditer(text):
            cited += 1
            if match.group(1) not in sections:
                unknown.append(f"{name}: §{match.group(1)}")
    # The notes' own cross-references (`§4.2`) name existing sections too.
    unknown += [f"docs/design.md: §{n}" for n in re.findall(r"§(\d+(?:\.\d+)?)",
                                                            _DESIGN.read_text())
                if n not in sections]
    assert not stale, f"cite docs/design.md §N instead of the unshipped design file: {stale}"
    assert not unknown, f"citations of sections docs/design.md does not have: {unknown}"
    assert cited >= 10, cited  # the scan really reads the files that cite the notes
