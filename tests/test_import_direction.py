"""The package's imports flow one way (docs/design.md, "Module map"):

    base -> config -> data -> model -> convert -> train -> index -> infer -> eval -> export
         -> aot -> commands

Every module of clara_jax/ belongs to one room; a module may import its own room and rooms to
its left, never one to its right. Every import counts: module level, inside functions (a lazy
import is still a dependency, only a later one), `import x.y` and `from x import y`, relative
forms resolved against the importing package. The rooms:

- base: fileio, workdir, distributed, errors, param_store and the package's `__init__`. They
  import nothing else of clara_jax, so any room can use them. errors.py holds only the base
  exception type (UserError); which exceptions the CLI reports in one line, and how, lives in
  cli.py, the one place allowed to know every room's exceptions.
- config: config.py, the experiment config and its validation. It sits left of data, so the
  few data facts its validation needs (the world sizes, the document frame) are defined in
  config.py and imported from there by clara_jax.data.
- model: model/ and losses.py (the losses are pure functions of model outputs).
- aot: aot.py, the backend of `clara compile`. It compiles the train, generate and encode
  steps, so it sits right of train, index and infer, and left of the commands that drive it.
- commands: commands/ and cli.py.

Nothing in clara_jax/ may import the repository's `projects`, `bench` or `tests`: those use
the package, never the other way round.

Pure `ast`: no module is imported, so this runs in well under a second.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clara_jax"

ROOMS = ("base", "config", "data", "model", "convert", "train", "index", "infer", "eval",
         "export", "aot", "commands")

# Module (or package) name -> room; a module takes the room of its longest listed prefix.
# The package itself ("clara_jax", its __init__) is matched exactly, never as a prefix, so a
# new top-level module has no room until it is listed here.
ROOM_OF = {
    "clara_jax": "base",
    "clara_jax.fileio": "base",
    "clara_jax.workdir": "base",
    "clara_jax.distributed": "base",
    "clara_jax.errors": "base",
    "clara_jax.param_store": "base",
    "clara_jax.config": "config",
    "clara_jax.data": "data",
    "clara_jax.model": "model",
    "clara_jax.losses": "model",
    "clara_jax.convert": "convert",
    "clara_jax.train": "train",
    "clara_jax.index": "index",
    "clara_jax.infer": "infer",
    "clara_jax.eval": "eval",
    "clara_jax.export": "export",
    "clara_jax.aot": "aot",
    "clara_jax.commands": "commands",
    "clara_jax.cli": "commands",
}

FORBIDDEN_ROOTS = ("projects", "bench", "tests")

# Edges (importing module, imported module) that point right and are tolerated: none now. An
# entry must still exist (test_known_exceptions_are_current), so the list cannot go stale.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        room = ROOM_OF.get(".".join(parts[:n]))
        if room is not None:
            return room
    return ROOM_OF["clara_jax"] if module == "clara_jax" else None


def is_module(name: str) -> bool:
    """Whether `name` is a module or package of clara_jax/ (else it names an attribute)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement anywhere in the file. `from M import
    N` names M.N when that is a module (`from clara_jax import errors`), else M."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                sub = f"{module}.{a.name}"
                out.append((node.lineno, sub if is_module(sub) else module))
    return sorted(set(out))  # one entry per statement and module


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importing module, imported module) for every import of a clara_jax module
    or of a forbidden root, over the whole package."""
    out = []
    for path in package_files():
        rel = str(path.relative_to(PACKAGE.parent))
        for line, target in imports(path):
            root = target.split(".")[0]
            if root == "clara_jax" or root in FORBIDDEN_ROOTS:
                out.append((rel, line, module_name(path), target))
    return out


def test_every_module_has_a_room():
    # A new top-level module or package must be placed in ROOM_OF, or its imports go unchecked.
    missing = [str(p.relative_to(PACKAGE.parent)) for p in package_files()
               if room_of(module_name(p)) is None]
    assert not missing, f"add these to ROOM_OF: {missing}"
    assert set(ROOM_OF.values()) <= set(ROOMS)


def test_imports_flow_left():
    bad = []
    for rel, line, source, target in edges():
        if target.split(".")[0] in FORBIDDEN_ROOTS:
            bad.append(f"{rel}:{line}: imports {target} (clara_jax must not import "
                       f"{target.split('.')[0]}/)")
            continue
        src, dst = room_of(source), room_of(target)
        assert dst is not None, f"{rel}:{line}: imports {target}, which is no clara_jax module"
        if ROOMS.index(dst) > ROOMS.index(src) and (source, target) not in KNOWN_EXCEPTIONS:
            bad.append(f"{rel}:{line}: {src} imports {target} ({dst} is right of {src})")
    assert not bad, "imports against " + " -> ".join(ROOMS) + ":\n" + "\n".join(bad)


def test_known_exceptions_are_current():
    present = {(source, target) for _, _, source, target in edges()}
    gone = sorted(KNOWN_EXCEPTIONS - present)
    assert not gone, f"no longer imported, remove from KNOWN_EXCEPTIONS: {gone}"


def test_the_scanner_sees_every_kind_of_import(tmp_path, monkeypatch):
    # The checks above pass only if nothing is found, so the scanner itself must find what it
    # should: module level and lazy, absolute and relative, a module and an attribute.
    pkg = tmp_path / "clara_jax"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "world.py").write_text("")
    (pkg / "data" / "x.py").write_text(
        "import clara_jax.export.bundle\n"
        "from . import world\n"
        "from .world import SIZES\n"
        "from .. import errors\n"
        "def f():\n"
        "    from clara_jax.commands import common\n"
        "    import tests.conftest\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    got = imports(pkg / "data" / "x.py")
    assert got == [(1, "clara_jax.export.bundle"), (2, "clara_jax.data.world"),
                   (3, "clara_jax.data.world"), (4, "clara_jax.errors"),
                   (6, "clara_jax.commands"), (7, "tests.conftest")]
    assert [room_of(m) for _, m in got[:5]] == ["export", "data", "data", "base", "commands"]
    assert room_of("clara_jax") == "base" and room_of("clara_jax.unlisted") is None
