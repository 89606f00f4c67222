"""Check that trtvae's TensorRT code only uses names that exist in the TensorRT Python API.

Runs without TensorRT: it parses the sources with ``ast`` and compares against name lists
extracted from the official bindings wheels by ``tools/extract_trt_names.py`` and stored
in ``tests/data/tensorrt_names/tensorrt-<version>.json`` (one file per version; add a
version by running the tool, all JSON files there are used).

Which files: every ``.py`` under ``trtvae/`` that imports the ``tensorrt`` module
(``import tensorrt``, ``import tensorrt as trt``, ``from tensorrt import ...`` or
``importlib.import_module("tensorrt")``). ``polygraphy.backend.trt`` is not TensorRT and its
names are never checked.

What is checked (per attribute access ``X.name``):

* ``X`` is the tensorrt module alias: ``name`` must be a top-level name
  (``trt.Logger``). Chains continue into classes/enums: ``trt.TensorIOMode.INPUT``,
  ``trt.ILogger.Severity.ERROR``; ``trt.Builder(logger).create_network`` is a member of
  ``Builder``. ``from tensorrt import Foo as F`` makes ``F`` stand for ``trt.Foo``.
* ``X`` is a variable named by convention (see ``TRT_VARIABLE_TYPES`` below): a plain name
  ``engine`` / ``_engine`` or ``self.engine`` / ``self._engine``: ``name`` must be a member
  of the mapped class (``engine.get_tensor_name`` -> ``ICudaEngine``). Only the first
  attribute after the variable is checked (we do not infer return types). A plain name
  bound by a non-TensorRT import (``from trtvae import runtime``) is not a convention
  variable.

Version rule: a name must exist in *every* stored version, unless it is guarded, in which
case it must exist in *at least one* version (this still catches typos):

* ``hasattr(X, "name")`` and ``getattr(X, "name", default)`` (with a default) are guarded;
  ``getattr(X, "name")`` without a default counts as a plain access;
* every access anywhere inside an ``if`` statement or conditional expression whose test
  calls ``hasattr(...)`` (test, body and ``elif``/``else`` branches, since the ``else`` is
  typically the fallback for the other versions) is guarded;
* any access inside a ``try:`` body whose handlers catch ``AttributeError`` is guarded;
* a line with the comment ``# trt-names: any-version`` is guarded (e.g. behind an explicit
  version check), and a line with ``# trt-names: ignore`` is skipped (e.g. a variable
  called ``profile`` that is not a TensorRT optimization profile).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

# Variable naming convention -> TensorRT class (as named in the bindings). Matches a plain
# name ``engine`` or ``_engine`` and ``self.engine`` / ``self._engine``. Extend freely;
# test_mapping_classes_exist checks that every class here exists in every version.
TRT_VARIABLE_TYPES: dict[str, str] = {
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "runtime": "Runtime",
    "builder": "Builder",
    "builder_config": "IBuilderConfig",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "profile": "IOptimizationProfile",
    "inspector": "EngineInspector",
    "timing_cache": "ITimingCache",
    "trt_logger": "Logger",  # trt.Logger: ILogger's members plus min_severity
}

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "trtvae"
NAMES_DIR = Path(__file__).resolve().parent / "data" / "tensorrt_names"
TENSORRT_MODULES = {"tensorrt", "tensorrt_bindings"}

_IMPORT_RE = re.compile(
    r"^\s*(import\s+tensorrt(_bindings)?\b|from\s+tensorrt(_bindings)?\s+import\b)"
    r"|import_module\(\s*['\"]tensorrt['\"]",
    re.MULTILINE,
)
_PRAGMA_RE = re.compile(r"#\s*trt-names:\s*(ignore|any-version)\b")


# --------------------------------------------------------------------------- name data


@dataclass(frozen=True)
class TrtApi:
    version: str
    top_level: frozenset[str]
    classes: dict[str, frozenset[str]]  # "Builder", "ILogger.Severity" -> member names


def load_versions(names_dir: Path = NAMES_DIR) -> list[TrtApi]:
    apis = []
    for path in sorted(names_dir.glob("tensorrt-*.json")):
        data = json.loads(path.read_text())
        apis.append(TrtApi(
            version=data["tensorrt_version"],
            top_level=frozenset(data["top_level"]),
            classes={k: frozenset(v) for k, v in data["module"].items()},
        ))
    return apis


# --------------------------------------------------------------------------- checker


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    name: str  # "ICudaEngine.device_memory_size" or "trt.NoSuchThing"
    missing_in: tuple[str, ...]
    guarded: bool

    def __str__(self) -> str:
        rule = "in any version" if self.guarded else "in " + ", ".join(self.missing_in)
        return f"{self.path}:{self.line}: {self.name} does not exist {rule}"


def imports_tensorrt(source: str) -> bool:
    return bool(_IMPORT_RE.search(source))


def _is_hasattr_or_getattr(node: ast.AST) -> str | None:
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.func.id
    return None


def _calls_hasattr(test: ast.AST) -> bool:
    return any(_is_hasattr_or_getattr(n) == "hasattr" for n in ast.walk(test))


class _Checker:
    # resolved objects: ("module", None) for the tensorrt module, ("class", "ICudaEngine")

    def __init__(self, tree: ast.Module, source: str, path: str, apis: list[TrtApi]):
        self.tree, self.path, self.apis = tree, path, apis
        self.lines = source.splitlines()
        self.module_aliases: set[str] = set()
        self.name_aliases: dict[str, str] = {}  # local name -> top-level tensorrt name
        self.other_imports: set[str] = set()  # names bound by other imports: never TRT objects
        self.findings: list[Finding] = []
        self.all_classes = set().union(*(a.classes for a in apis)) if apis else set()
        self._collect_imports()

    # -- imports
    def _collect_imports(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    root = a.name.split(".")[0]
                    if root in TENSORRT_MODULES:
                        self.module_aliases.add(a.asname or root)
                    else:
                        self.other_imports.add(a.asname or root)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in TENSORRT_MODULES:
                for a in node.names:
                    if a.name != "*":
                        self.name_aliases[a.asname or a.name] = a.name
                        self._check_top(a.name, node.lineno, guarded=False)
            elif isinstance(node, ast.ImportFrom):
                self.other_imports.update(a.asname or a.name for a in node.names)
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                  and isinstance(node.value.func, (ast.Attribute, ast.Name))
                  and getattr(node.value.func, "attr", getattr(node.value.func, "id", None)) == "import_module"
                  and node.value.args and isinstance(node.value.args[0], ast.Constant)
                  and node.value.args[0].value in TENSORRT_MODULES):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.module_aliases.add(t.id)

    # -- resolution
    def resolve(self, node: ast.AST) -> tuple[str, str | None] | None:
        if isinstance(node, ast.Name):
            if node.id in self.module_aliases:
                return ("module", None)
            if node.id in self.name_aliases:
                top = self.name_aliases[node.id]
                return ("class", top) if top in self.all_classes else None
            return None if node.id in self.other_imports else self._convention(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return self._convention(node.attr)
            base = self.resolve(node.value)
            if base == ("module", None):
                return ("class", node.attr) if node.attr in self.all_classes else None
            if base and base[0] == "class":
                nested = f"{base[1]}.{node.attr}"
                return ("class", nested) if nested in self.all_classes else None
            return None
        if isinstance(node, ast.Call):
            # trt.Builder(logger) / trt.Runtime(logger) -> an instance of that class
            func = node.func
            if isinstance(func, ast.Attribute) and self.resolve(func.value) == ("module", None):
                return self.resolve(func)
            if isinstance(func, ast.Name) and func.id in self.name_aliases:
                return self.resolve(func)
        return None

    @staticmethod
    def _convention(name: str) -> tuple[str, str] | None:
        key = name[1:] if name.startswith("_") else name
        cls = TRT_VARIABLE_TYPES.get(key)
        return ("class", cls) if cls else None

    # -- checks
    def _report(self, name: str, line: int, guarded: bool, exists) -> None:
        relevant = [a for a in self.apis if exists(a) is not None]
        missing = tuple(a.version for a in relevant if not exists(a))
        if not relevant:
            return
        if guarded:
            if len(missing) == len(relevant):
                self.findings.append(Finding(self.path, line, name, missing, True))
        elif missing:
            self.findings.append(Finding(self.path, line, name, missing, False))

    def _check_top(self, attr: str, line: int, guarded: bool) -> None:
        self._report(f"tensorrt.{attr}", line, guarded, lambda a: attr in a.top_level)

    def _check_member(self, cls: str, attr: str, line: int, guarded: bool) -> None:
        if attr.startswith("__") and attr.endswith("__"):
            return  # Python protocol names (__init__ of a subclassed trt.IProgressMonitor): not in the lists
        # versions without the class itself are not counted here (reported where the
        # class is named, e.g. trt.IAlgorithmSelector)
        self._report(f"{cls}.{attr}", line, guarded,
                     lambda a: (attr in a.classes[cls]) if cls in a.classes else None)

    def check_access(self, obj: ast.AST, attr: str, line: int, guarded: bool) -> None:
        pragma = _PRAGMA_RE.search(self.lines[line - 1]) if 0 < line <= len(self.lines) else None
        if pragma and pragma.group(1) == "ignore":
            return
        guarded = guarded or bool(pragma)
        base = self.resolve(obj)
        if base is None:
            return
        if base[0] == "module":
            self._check_top(attr, line, guarded)
        else:
            self._check_member(base[1], attr, line, guarded)

    def run(self) -> list[Finding]:
        self._visit(self.tree, False)
        return self.findings

    def _visit(self, node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Attribute):
            self.check_access(node.value, node.attr, node.lineno, guarded)
        elif isinstance(node, ast.Call):
            kind = _is_hasattr_or_getattr(node)
            if kind:
                soft = guarded or kind == "hasattr" or len(node.args) >= 3
                self.check_access(node.args[0], node.args[1].value, node.lineno, soft)
        if isinstance(node, (ast.If, ast.IfExp)) and _calls_hasattr(node.test):
            guarded = True
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            catches = any(_catches_attribute_error(h) for h in node.handlers)
            for child in node.body:
                self._visit(child, guarded or catches)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self._visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            self._visit(child, guarded)


def _catches_attribute_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None)
             for n in ast.walk(handler.type) if isinstance(n, (ast.Name, ast.Attribute))}
    return bool(names & {"AttributeError", "Exception", "BaseException"})


def check_source(source: str, path: str = "<string>", apis: list[TrtApi] | None = None) -> list[Finding]:
    """Return the TensorRT names used in ``source`` that are missing from the stored versions."""
    apis = load_versions() if apis is None else apis
    return _Checker(ast.parse(source, filename=path), source, path, apis).run()


def tensorrt_source_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    if not package_dir.is_dir():
        return []
    return [p for p in sorted(package_dir.rglob("*.py")) if imports_tensorrt(p.read_text())]


# --------------------------------------------------------------------------- tests

APIS = load_versions()
VERSIONS = [a.version for a in APIS]
V10 = [v for v in VERSIONS if v.startswith("10.")]
V11 = [v for v in VERSIONS if v.startswith("11.")]


def _names(findings: list[Finding]) -> set[str]:
    return {f.name for f in findings}


def test_name_data_present():
    assert V10 and V11, f"need stored 10.x and 11.x name lists, have {VERSIONS}"
    for api in APIS:
        assert "STRONGLY_TYPED" in api.classes["NetworkDefinitionCreationFlag"]
        assert {"set_tensor_address", "execute_async_v3"} <= api.classes["IExecutionContext"]
        assert "USER_MANAGED" in api.classes["ExecutionContextAllocationStrategy"]


def test_mapping_classes_exist():
    for var, cls in TRT_VARIABLE_TYPES.items():
        missing = [a.version for a in APIS if cls not in a.classes]
        assert not missing, f"TRT_VARIABLE_TYPES[{var!r}] = {cls!r} is not a class in {missing}"


def test_selfcheck_detects_removed_names():
    src = (
        "import tensorrt as trt\n"
        "flag = trt.BuilderFlag.FP16\n"
        "def f(engine, self):\n"
        "    n = engine.device_memory_size\n"
        "    m = self._engine.device_memory_size_v2\n"
        "    trt.NoSuchThing\n"
        "    getattr(engine, 'no_such_member', None)\n"
    )
    found = {f.name: f for f in check_source(src, apis=APIS)}
    assert set(found) == {"BuilderFlag.FP16", "ICudaEngine.device_memory_size",
                          "ICudaEngine.device_memory_size_v2", "tensorrt.NoSuchThing",
                          "ICudaEngine.no_such_member"}, found
    for name in ("BuilderFlag.FP16", "ICudaEngine.device_memory_size"):
        assert set(found[name].missing_in) == set(V11), found[name]
        assert not set(found[name].missing_in) & set(V10)
    assert "10.0.1" in found["ICudaEngine.device_memory_size_v2"].missing_in
    assert found["ICudaEngine.no_such_member"].guarded
    assert set(found["tensorrt.NoSuchThing"].missing_in) == set(VERSIONS)


def test_selfcheck_accepts_valid_and_guarded_code():
    src = (
        "import tensorrt as trt\n"
        "from tensorrt import Logger as L, TensorIOMode\n"
        "from polygraphy.backend.trt import engine_from_network, Profile\n"
        "class R:\n"
        "    def __init__(self, engine):\n"
        "        self._trt_logger = trt.Logger(trt.Logger.WARNING)\n"
        "        self._runtime = trt.Runtime(self._trt_logger)\n"
        "        self.engine = self._runtime.deserialize_cuda_engine(b'')\n"
        "        self._context = self.engine.create_execution_context(\n"
        "            trt.ExecutionContextAllocationStrategy.USER_MANAGED)\n"
        "        flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)\n"
        "        if engine.get_tensor_mode('x') == trt.TensorIOMode.INPUT == TensorIOMode.INPUT:\n"
        "            self._context.set_tensor_address('x', 0)\n"
        "        self._context.execute_async_v3(0)\n"
        "        sev = trt.ILogger.Severity.ERROR, L.Severity.INFO\n"
        "        net = trt.Builder(self._trt_logger).create_network(flag)\n"
        "        if hasattr(engine, 'device_memory_size_v2'):\n"
        "            size = engine.device_memory_size_v2\n"
        "        else:\n"
        "            size = engine.device_memory_size\n"
        "        size = getattr(engine, 'device_memory_size_v2', None)\n"
        "        fp16 = getattr(trt.BuilderFlag, 'FP16', None)\n"
        "        x = engine.device_memory_size_v2 if hasattr(engine, 'device_memory_size_v2') else 0\n"
        "        try:\n"
        "            y = engine.device_memory_size\n"
        "        except AttributeError:\n"
        "            y = 0\n"
        "        z = engine.device_memory_size  # trt-names: any-version\n"
        "        profile = Profile(); profile.add('x', (1,), (1,), (1,))  # trt-names: ignore\n"
        "        engine_from_network(net)\n"
    )
    findings = check_source(src, apis=APIS)
    assert findings == [], "\n".join(map(str, findings))


def test_guard_scope_ends_with_the_if():
    src = (
        "import tensorrt as trt\n"
        "if hasattr(trt.BuilderFlag, 'FP16'):\n"
        "    a = trt.BuilderFlag.FP16\n"
        "else:\n"
        "    a = trt.BuilderFlag.NOT_A_FLAG\n"
        "b = trt.BuilderFlag.FP16\n"
        "try:\n"
        "    c = trt.BuilderFlag.FP16\n"
        "except ValueError:\n"
        "    pass\n"
    )
    found = [(f.line, f.name, f.guarded) for f in check_source(src, apis=APIS)]
    assert found == [(5, "BuilderFlag.NOT_A_FLAG", True), (6, "BuilderFlag.FP16", False),
                     (8, "BuilderFlag.FP16", False)], found


def test_file_selection():
    assert imports_tensorrt("import tensorrt as trt\n")
    assert imports_tensorrt("def f():\n    import tensorrt\n")
    assert imports_tensorrt("from tensorrt import Logger\n")
    assert not imports_tensorrt("from polygraphy.backend.trt import engine_from_network\n")
    assert not imports_tensorrt("import tensorrt_llm\n")


@pytest.mark.parametrize("api", APIS, ids=VERSIONS)
def test_name_lists_are_nonempty(api):
    assert len(api.top_level) > 100 and "ICudaEngine" in api.classes


def test_trtvae_sources_use_existing_tensorrt_names():
    files = tensorrt_source_files()
    findings = []
    for path in files:
        findings += check_source(path.read_text(), str(path.relative_to(REPO_ROOT)), APIS)
    assert not findings, (
        f"TensorRT names missing from stored API versions {VERSIONS} "
        "(guard with hasattr/getattr(..., default) if version-dependent):\n"
        + "\n".join(map(str, findings))
    )
