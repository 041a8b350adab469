"""Rewritten graphs for people: a readable listing with Quaff nodes marked, and a Graphviz drawing."""
from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from .errors import QuaffError
from .io import check_target
from .quaff_linear import QuaffLinear

MARK = "◆"


def is_quaff(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), QuaffLinear)
    return node.op == "call_function" and "quaff" in str(node.target)


def _target(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return f"{type(mod).__name__}[{node.target}]"
    if node.op == "call_function" and not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _shape(node: Node) -> str:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    return "x".join(str(d) for d in shape) if shape is not None else ""


def _arg(a) -> str:
    if isinstance(a, Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def graph_summary(gm: GraphModule) -> dict:
    counts = Counter(_target(gm, n).split("[")[0] for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
    quaff = [n for n in gm.graph.nodes if is_quaff(gm, n)]
    return {"nodes": len(gm.graph.nodes), "quaff_nodes": len(quaff), "top_targets": dict(counts.most_common(12))}


def graph_text(gm: GraphModule, quaff_only: bool = False) -> str:
    """One line per node: ``◆ %name = target(args) : shape``; Quaff nodes marked with ◆."""
    lines = []
    for n in gm.graph.nodes:
        q = is_quaff(gm, n)
        if quaff_only and not q:
            continue
        extra = ""
        if q and n.op == "call_module":
            mod = gm.get_submodule(n.target)
            extra = f"  # outliers={mod.outlier_idx.numel()}" + (" prescaled" if mod.prescaled else "")
        args = ", ".join(_arg(a) for a in n.args)
        shape = _shape(n)
        shape = f" : {shape}" if shape else ""
        lines.append(f"{MARK if q else ' '} %{n.name} = {n.op} {_target(gm, n)}({args}){shape}{extra}")
    return "\n".join(lines)


def graph_dot(gm: GraphModule) -> str:
    """Graphviz DOT of the graph; Quaff nodes are filled orange, parameters omitted."""
    out = ["digraph quaff {", "  rankdir=TB; node [shape=box, fontname=monospace, fontsize=9];"]
    shown = {n for n in gm.graph.nodes if n.op != "get_attr"}
    for n in shown:
        label = f"{n.name}\\n{_target(gm, n)[:60]}".replace('"', "'")
        style = ', style=filled, fillcolor="#ffb347"' if is_quaff(gm, n) else ""
        out.append(f'  "{n.name}" [label="{label}"{style}];')
    for n in shown:
        for a in n.all_input_nodes:
            if a in shown:
                out.append(f'  "{a.name}" -> "{n.name}";')
    out.append("}")
    return "\n".join(out)


def write_dot(gm: GraphModule, path: str | Path) -> Path:
    """Write DOT text, or SVG/PNG when the name asks for it and Graphviz's ``dot`` is installed."""
    path = Path(path)
    check_target(path, force=True)  # overwriting a drawing is fine; a missing folder is not
    dot = graph_dot(gm)
    if path.suffix in (".svg", ".png"):
        exe = shutil.which("dot")
        if exe is None:
            raise QuaffError(f"writing {path.suffix} needs Graphviz's `dot` program (apt-get install graphviz); "
                             "or give a .dot file name")
        subprocess.run([exe, f"-T{path.suffix[1:]}", "-o", str(path)], input=dot.encode(), check=True)
    else:
        path.write_text(dot)
    return path
