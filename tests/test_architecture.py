"""The layout holds: no import cycles among the library's modules (imports inside functions and under
TYPE_CHECKING count), no module over 400 lines, and the registries find what a new file declares."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import interp_cache
from conftest import hooked, padded_batch
from interp_cache.adapters.registry import families, family_of
from interp_cache.compress import EvictionPolicy, policy_names
from interp_cache.compress import registry as policy_registry
from interp_cache.compress.spec import parse_policy
from interp_cache.core.hook_layout import HookKind
from interp_cache.models.zoo import zoo_config
from interp_cache.verify.checks import _identity_policies, verify

PACKAGE = Path(interp_cache.__file__).parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every library module `path` imports anywhere in its body, `from package import module` included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_among_library_modules():
    modules = library_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert sum(len(targets) for targets in graph.values()) > 50  # the parser sees the imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_subpackages_import_each_other_in_one_direction():
    modules = library_modules()
    package = lambda name: ".".join(name.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {package(name): set() for name in modules}
    for name, path in modules.items():
        graph[package(name)] |= {package(target) for target in imported_modules(path, modules)} - {package(name)}
    assert "interp_cache.cache" not in str(graph["interp_cache.core"])
    assert find_cycle(graph) is None, f"subpackage cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_module_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in library_modules().items()}
    assert max(sizes.values()) <= MAX_LINES, {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_every_family_serves_its_own_zoo_config_and_no_other():
    assert len(families()) == 19  # 14 families with adapters + gpt_neo, codegen + 3 declared on the generic path
    for name in families():
        assert family_of(zoo_config(name)) == name


def test_every_hook_point_declares_the_layout_its_activations_have_llama_bloom_gpt2():
    """Record every hook of a cached run; each activation's rank and fixed sizes match its point's layout."""
    for family in ("llama", "bloom", "gpt2"):
        model = hooked(family)
        input_ids, attention_mask = padded_batch(model)
        with model.record() as rec:
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
        assert set(rec.names()) == set(model.hook_dict) - {"blocks.0.cache.hook_scores", "blocks.0.cache.hook_keep",
                                                           "blocks.1.cache.hook_scores", "blocks.1.cache.hook_keep"}
        for name in rec.names():
            layout = model.hook_point(name).layout
            assert rec.layout(name) == layout
            for call in rec[name]:
                shape = call.activation.shape
                assert len(shape) == len(layout.axes), name
                for axis, size in zip(layout.axes, layout.sizes):
                    if size is not None:
                        assert shape[layout.axes.index(axis)] == size, (name, axis)
                if layout.token_axis is not None:
                    assert shape[layout.token_axis] == call.positions.shape[1], name
                if layout.dtype is not None:
                    assert call.activation.dtype == layout.dtype, name


def test_an_unknown_hook_name_lists_the_close_matches_llama():
    model = hooked("llama")
    with pytest.raises(ValueError, match=r"no hook point named 'blocks.1.attn.hook_patern'.*close matches: "
                                         r"blocks.1.attn.hook_pattern"):
        model.hook_point("blocks.1.attn.hook_patern")
    with pytest.raises(ValueError, match=r"close matches: .*blocks.0.cache.hook_k_read"):
        model.record("blocks.0.cache.hook_kread").__enter__()
    with pytest.raises(TypeError, match="a hook point name is a string"):
        model.hook_point(3)
    assert model.hook_point("blocks.0.attn.hook_z").layout.kind is HookKind.TOKENS


def test_a_policy_defined_only_here_reaches_the_spec_parser_and_the_identity_row_llama():
    """One class in this file, nothing else touched: parsed from a spec, and checked bitwise at full budget."""

    @dataclass
    class KeepNewest(EvictionPolicy, name="test-keep-newest"):
        budget: int = 8

        @classmethod
        def covering(cls, num_tokens):
            return cls(budget=num_tokens)

        def layer_budget(self, layer_idx, num_layers, num_entries):
            return self.budget

        def scores(self, obs, running_bgk):
            return obs.positions_bgk.float()

    try:
        assert "test-keep-newest" in policy_names()
        assert parse_policy("test-keep-newest:budget=5") == KeepNewest(budget=5)
        assert any(isinstance(policy, KeepNewest) for policy in _identity_policies(40))
        model = hooked("llama")
        report = verify(model, prompts=["A short prompt", "Hi"], max_new_tokens=2)
        row = next(row for row in report.rows if row.check == "compression")
        assert row.passed and "KeepNewest" in row.note, row.note
        assert row.note.startswith(f"{len(policy_names())} policies")
    finally:
        policy_registry.unregister("test-keep-newest")
    assert "test-keep-newest" not in policy_names()


def test_a_policy_must_say_how_it_covers_a_sequence():
    with pytest.raises(TypeError, match="must define covering"):
        class NoIdentity(EvictionPolicy, name="test-no-identity"):
            pass
    assert "test-no-identity" not in policy_names()
