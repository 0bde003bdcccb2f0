"""The house rules of the layout, read from the source: the core names no built-in plugin, and
a plugin family imports another family's public modules only."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from adaptkit.registry import KINDS, registry

ROOT = Path(__file__).resolve().parent.parent
#: registered names that are also plain words of the core's vocabulary ("the adapter file", "a prompt"):
#: for these only a string that is exactly the name counts (what `if name == "full"` would be)
ORDINARY_WORDS = {"adapter", "full", "prefix", "prompt", "captions", "classification", "shards", "digits", "contrastive",
                  "jsonl", "diffusers", "peft"}  # (jsonl: the extension of metrics.jsonl, a file the core reads;
#                                   diffusers, peft: libraries the core reads and writes the files of)


def built_in_names() -> set[str]:
    reg = registry()
    names = {record.name for kind in KINDS for record in reg.records(kind) if reg.source(record.provider) == "built-in"}
    loggers = {record.name for record in reg.loggers() if reg.source(record.provider) == "built-in"}
    formats = {record.name for record in reg.export_formats() if reg.source(record.provider) == "built-in"}
    return names | loggers | formats | {preset.name for preset in reg.presets()}


def is_docstring(tokens: list[tokenize.TokenInfo], index: int) -> bool:
    """A string that is a statement of its own (a module, class or function docstring)."""
    before, after = index - 1, index + 1
    while before >= 0 and tokens[before].type in (tokenize.NL, tokenize.COMMENT):
        before -= 1
    while after < len(tokens) and tokens[after].type in (tokenize.NL, tokenize.COMMENT):
        after += 1
    starts = before < 0 or tokens[before].type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    return starts and tokens[after].type == tokenize.NEWLINE


def plugin_names_in(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each built-in plugin name in ``path``'s code and strings, docstrings aside."""
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for index, token in enumerate(tokens):
        if token.type == tokenize.STRING and not is_docstring(tokens, index):
            body = re.sub(r"^[a-zA-Z]*('''|\"\"\"|'|\")|('''|\"\"\"|'|\")$", "", token.string)
            words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", body)) - ORDINARY_WORDS
            if body in ORDINARY_WORDS:
                words.add(body)
        elif token.type == tokenize.NAME:
            words = {token.string} - ORDINARY_WORDS
        else:
            continue
        found += [(token.start[0], name) for name in sorted(words & names)]
    return found


def test_the_core_names_no_built_in_plugin_outside_docstrings():
    names = built_in_names()
    assert {"lora", "vit", "clip_stylegan_edit", "full"} <= names  # the check looks for real names
    found = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in sorted((ROOT / "adaptkit").rglob("*.py")) for line, name in plugin_names_in(path, names)]
    assert found == []


def test_the_check_finds_a_plugin_name_in_code(tmp_path):
    (tmp_path / "x.py").write_text('"""A docstring may say lora."""\nif spec.task.name == "full":\n    use(vit)\n')
    assert plugin_names_in(tmp_path / "x.py", {"lora", "full", "vit"}) == [(2, "full"), (3, "vit")]


def test_the_core_imports_no_plugin_module():
    allowed = {("adaptkit/registry.py", "adaptkit_plugins")}  # to find registry.yaml beside the built-ins
    found = []
    for path in sorted((ROOT / "adaptkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                where = (str(path.relative_to(ROOT)), module)
                if module.split(".")[0] == "adaptkit_plugins" and where not in allowed:
                    found.append(where)
    assert found == []


def test_a_family_imports_no_private_module_of_another():
    plugins = ROOT / "plugins"
    found = []
    for path in sorted(plugins.rglob("*.py")):
        family = path.relative_to(plugins).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaptkit_plugins."):
                parts = node.module.split(".")[1:]
                imported = [*parts, *(a.name for a in node.names)] if len(parts) == 1 else parts
                if imported[0] != family and any(p.startswith("_") for p in imported[1:]):
                    found.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert found == []


def test_a_model_family_imports_no_other_model_family():
    # they meet through the registry (diffusion builds its text encoder as the `clip` backbone by name),
    # and share what is generic through the core or the generic folders (methods/, tasks/, data/)
    families = {"timm", "clip", "diffusion", "stylegan"}
    plugins = ROOT / "plugins"
    found = []
    for path in sorted(plugins.rglob("*.py")):
        family = path.relative_to(plugins).parts[0]
        if family not in families:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                parts = module.split(".")
                if parts[0] == "adaptkit_plugins" and len(parts) > 1 and parts[1] in families - {family}:
                    found.append(f"{path.relative_to(ROOT)}: {module}")
    assert found == []
