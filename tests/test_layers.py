"""The architecture, enforced: every import in the product points down the layers.

    launch      topology loading, Ray placement, Deployment, the CLI      may import anything
    bench       the benchmark client (disagg bench)                        config, serving
    serving     disagg/*: gateway, pool, instance, actor, models           config, scheduler
    scheduler   gateway routing: policies, decider, prefix index           config
    transfer    the vLLM connector, NIXL, ZMQ control, KV store            config, kernels
    kernels     paged-KV gather/scatter                                    config
    config      disagg.config (schema), disagg.tiers (tier names),
                disagg.tp_layout (which KV heads a TP rank holds and reads)   nothing of ours

Imports inside functions count too (ARCHITECTURE.md explains the layers).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"disagg": "disagg", "transfer": "disagg.transfer", "kernels": "disagg.kernels",
           "scheduler": "disagg.scheduler", "launch": "disagg.launch"}
ALLOWED = {
    "config": {"config"},
    "kernels": {"config", "kernels"},
    "transfer": {"config", "kernels", "transfer"},
    "scheduler": {"config", "scheduler"},
    "serving": {"config", "scheduler", "serving"},
    "bench": {"config", "serving", "bench"},
    "launch": {"config", "kernels", "transfer", "scheduler", "serving", "bench", "launch"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("config", "tiers", "credentials", "tp_layout"):
        return "config"
    if len(parts) > 1 and parts[1] in ("kernels", "transfer", "scheduler", "launch", "bench"):
        return parts[1]
    return "serving"


def product_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every product module."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every ``disagg.*`` module ``path`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # ``from disagg import gateway`` imports the module disagg.gateway
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
    return {m for m in found if m == "disagg" or m.startswith("disagg.")}


def test_every_folder_has_modules():
    layers = {layer_of(m) for m in product_modules()}
    assert layers == set(ALLOWED), layers


def test_imports_point_down_the_layers():
    bad = []
    for module, path in product_modules().items():
        mine = layer_of(module)
        for target in sorted(imports_of(module, path)):
            if layer_of(target) not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}: {module} ({mine}) imports {target} "
                           f"({layer_of(target)})")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


def test_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "gateway.py"
    bad.write_text("def f():\n    from disagg.launch.api import launch\n")
    targets = imports_of("disagg.gateway", bad)
    assert targets == {"disagg.launch.api", "disagg.launch.api.launch"}
    assert layer_of("disagg.launch.api") not in ALLOWED[layer_of("disagg.gateway")]
    rel = tmp_path / "__init__.py"
    rel.write_text("from ..scheduler import base\nfrom . import x\n")
    assert imports_of("disagg.transfer", rel) == {
        "disagg.scheduler", "disagg.scheduler.base", "disagg.transfer", "disagg.transfer.x"}


def test_no_test_doubles_in_the_product():
    doubles = [f"{p.relative_to(ROOT)}: {n.name}" for p in product_modules().values()
               for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.ClassDef) and n.name.startswith(("Fake", "Mock", "Stub"))]
    assert not doubles, doubles


@pytest.mark.parametrize("folder", [*FOLDERS, "benchmarks", "tests", "scripts"])
def test_no_sys_path_edits(folder):
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
            if p != Path(__file__).resolve() and "sys.path" in p.read_text()]
    assert not hits, hits


def test_the_gateway_loads_no_engine_or_store_code():
    code = ("import sys, disagg.gateway; print(sorted(m for m in ('redis', 'torch', 'vllm', "
            "'ray', 'nixl', 'nixl_cu12', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
