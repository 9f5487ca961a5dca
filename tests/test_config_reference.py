"""docs/config.md against the code: every field of base_config() (and of the demo's own
section, configs/demo.py's demo_section()) documented once, in its section's table, with its
default as a Python literal equal to the code's; enum fields list the validator's values;
derived fields say so; each shipped config's table of changes is the difference between its
finalized config and base_config(). No JAX work: parsing only."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from clara_jax import config as cfg
from clara_jax.data.world import WORLD_SIZES
from tests.conftest import REPO

DOC = REPO / "docs" / "config.md"
REFERENCE_HEADER = ["field", "default", "allowed", "meaning"]
CHANGES_HEADER = ["field", "value"]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")

# Fields whose validator checks membership of a tuple: the doc's allowed column names each value.
ENUMS = {
    "model.remat": cfg.REMAT_POLICIES,
    "model.memory_layout": cfg.MEMORY_LAYOUTS,
    "model.latent_positions": cfg.LATENT_POSITIONS,
    "model.dtype": cfg.DTYPES,
    "data.stage_doc_chunks": cfg.STAGE_DOC_CHUNKS,
    "train.schedule": ("cosine", "constant"),
    "train.nan_policy": ("stop", "skip"),
    "demo.world_size": tuple(w for w in WORLD_SIZES if "/" not in w),
}


def documented_config():
    """base_config() with the demo's section (which the library's config does not hold)."""
    c = cfg.base_config()
    c.demo = importlib.import_module("configs.demo").demo_section()
    return c


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(nearest heading above, header cells, body rows) of every Markdown table in `text`."""
    tables, heading, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            header = _cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                row = _cells(lines[i])
                assert len(row) == len(header), f"docs/config.md: {lines[i]!r} has {len(row)} " \
                    f"cells, the table's header {len(header)} (a '|' inside a cell?)"
                rows.append(row)
                i += 1
            tables.append((heading, header, rows))
            continue
        i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"docs/config.md: expected one `code` span, got {cell!r}"
    return m.group(1)


def _literal(cell: str):
    text = _code(cell)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise AssertionError(f"docs/config.md: {text!r} is not a Python literal") from e


def _same(a, b) -> bool:
    """Equal and of the same type (32.0 is not 32: overrides are cast to the default's type)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def tables():
    return parse_tables(DOC.read_text())


@pytest.fixture(scope="module")
def reference(tables) -> dict[str, tuple[str, list[str]]]:
    """field -> (section heading, row) from the reference tables; each field once."""
    out = {}
    for heading, header, rows in tables:
        if header != REFERENCE_HEADER:
            continue
        for row in rows:
            field = _code(row[0])
            assert field not in out, f"docs/config.md documents {field} twice"
            out[field] = (heading, row)
    return out


def test_every_field_is_documented_and_no_other(reference):
    fields = set(flatten(documented_config()))
    missing, unknown = sorted(fields - set(reference)), sorted(set(reference) - fields)
    assert not (missing or unknown), (f"fields of base_config() missing from docs/config.md: "
                                      f"{missing}; fields it names that do not exist: {unknown}")


def test_fields_sit_in_their_sections_table(reference):
    for field, (heading, _) in reference.items():
        assert heading == field.rpartition(".")[0], f"{field} is in the table under {heading!r}"


def test_documented_defaults_equal_base_config(reference):
    base = flatten(documented_config())
    for field, (_, row) in reference.items():
        if field in base:
            doc = _literal(row[1])
            assert _same(doc, base[field]), \
                f"docs/config.md: {field} default {doc!r}, base_config() has {base[field]!r}"


def test_enum_fields_list_the_validators_values(reference):
    for field, values in ENUMS.items():
        allowed = reference[field][1][2]
        missing = [v for v in values if f'"{v}"' not in allowed]
        assert not missing, f"docs/config.md: {field}'s allowed values lack {missing}"


def test_derived_fields_say_so(reference):
    base = flatten(cfg.base_config())
    derived = flatten(cfg.finalize(cfg.base_config()))
    changed = [f for f in base if not _same(base[f], derived[f])]
    assert changed, "finalize() derives no field: this test checks nothing"
    for field in changed:
        row = reference[field][1]
        assert "derived" in row[2] and "derived" in row[3].lower(), \
            f"docs/config.md: {field} is filled by finalize(); its row must say 'derived'"


def test_config_files_are_listed(tables):
    (files,) = [rows for heading, header, rows in tables if heading == "Config files"]
    assert sorted(_code(row[0]).removeprefix("configs/") for row in files) == CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_config_changes_table(tables, name):
    found = [rows for heading, header, rows in tables
             if heading == f"configs/{name}" and header == CHANGES_HEADER]
    assert len(found) == 1, f"docs/config.md needs one 'field | value' table under configs/{name}"
    doc = {_code(row[0]): _literal(row[1]) for row in found[0]}
    module = importlib.import_module(f"configs.{name.removesuffix('.py')}")
    base, shipped = flatten(documented_config()), flatten(module.get_config())
    changes = {f: v for f, v in shipped.items() if not _same(v, base[f])}
    assert set(doc) == set(changes), (
        f"configs/{name}: undocumented changes {sorted(set(changes) - set(doc))}, "
        f"documented but unchanged {sorted(set(doc) - set(changes))}")
    for field, value in changes.items():
        assert _same(doc[field], value), f"configs/{name}: {field} is {value!r}, doc {doc[field]!r}"


def test_reference_is_linked():
    for path in ("README.md", "docs/user_guide.md", "clara_jax/config.py"):
        assert "config.md" in (REPO / path).read_text(), f"{path} does not link docs/config.md"
