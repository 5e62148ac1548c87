"""The layering docs/ARCHITECTURE.md describes, checked on the source: a module imports only from its own
layer or the ones below (imports inside functions included), and no two modules import each other at
load time. A new module that lands in the wrong room fails here, with the import that put it there."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fabrika"

# Lowest first; a module belongs to the first entry naming it or its package. The stages that live in the
# package of what they make (tokenizer, collect, prepare) sit with the other stages.
LAYERS = [
    ("base", ["errors", "config", "artifacts", "logs", "faults", "ranks"]),
    ("models", ["models.presets", "models.templates", "models.checks", "models.refs", "models.model_dir",
                "models.plan", "models.reference"]),
    ("data", ["data.formats", "data.sources", "data.text_sources", "data.filters"]),
    ("infer", ["infer.generation", "infer.costs", "infer.client", "infer.batch", "infer.llamacpp",
               "infer.backends", "infer.vllm_engine", "infer.serve", "infer.local", "infer.chat"]),
    ("stages", ["models.tokenizer", "data.collect", "data.corpus", "train", "evaluate", "export"]),
    ("top", ["runs", "relative_paths", "dry_run", "report", "pipeline", "docs", "cli", "infer.commands"]),
]


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"fabrika.{module} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported fabrika module, imported at load time) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fabrika"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("fabrika")]
        for name in names:
            parts = name.split(".")[1:]
            for k in range(len(parts), 0, -1):  # the longest prefix that is a module
                if ".".join(parts[:k]) in known:
                    found.append((".".join(parts[:k]), id(node) in top_level))
                    break
    return found


def test_every_import_points_down_the_layers():
    mods = modules()
    wrong = [f"fabrika.{m} ({LAYERS[layer_of(m)][0]}) imports fabrika.{t} ({LAYERS[layer_of(t)][0]})"
             for m, path in mods.items() for t, _ in imports(path, set(mods)) if layer_of(t) > layer_of(m)]
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_at_load_time():
    mods = modules()
    graph = {m: {t for t, eager in imports(path, set(mods)) if eager and t != m} for m, path in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = trail[trail.index(t):] + [t] if t in trail else [m, t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
