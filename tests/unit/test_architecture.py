"""The structure docs/architecture.md promises, checked from the source: no import cycle (counting imports
inside functions and modules named in strings, such as cli.COMMANDS), no cross-package import of a private
name, no module over 400 lines, and model family names only inside models/families/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """module -> modules it imports (anywhere in the file, or names as a 'diffusion_dpo.x' string); and the
    private names imported across packages."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion_dpo"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else node.module)
                    if alias.name.startswith("_") and not alias.name.startswith("__") \
                            and node.module.split(".")[:2] != mod.split(".")[:2]:
                        private.append(f"{mod} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("diffusion_dpo")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"diffusion_dpo(\.\w+)+", node.value):
                targets.append(node.value)  # import_module("diffusion_dpo.commands.train") and the like
            for target in targets:
                owner = _owner(target, modules)
                if owner and owner != mod and not mod.startswith(owner + "."):
                    edges[mod].add(owner)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_no_private_imports_across_packages():
    modules = _modules()
    edges, private = _imports(modules)
    assert "diffusion_dpo.commands.train" in edges["diffusion_dpo.cli"]  # string-named modules are followed
    assert _cycles(edges) == []
    assert private == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_family_names_live_in_the_families_package():
    """The trainer, cache, sampler and evaluation ask the family object; only the families, the config's
    choices, the test-model builders, the published real-size configs and the demo (which builds its own SD
    model) name a family."""
    allowed = ("models/families/", "models/build.py", "models/arch_configs.py", "config.py", "demo/")
    # "lcm" alone is also a scheduler's name (evaluate.sampling.SCHEDULERS): only comparisons with it count
    pattern = re.compile(r"""family\s*(==|!=|in)\s|["'](sdxl|sd3|flux)["']|[=!]=\s*["']lcm["']""")
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
            if not str(p.relative_to(SRC / "diffusion_dpo")).startswith(allowed)
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
