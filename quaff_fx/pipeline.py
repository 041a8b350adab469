"""Running passes: the protocol of ``torch.fx.passes.infra`` plus a report on every result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .errors import QuaffError
from .report import PassReport


class QuaffPassResult(PassResult):
    """``PassResult(graph_module, modified)`` with the pass's ``report``."""

    def __new__(cls, graph_module: GraphModule, modified: bool, report: PassReport) -> "QuaffPassResult":
        self = super().__new__(cls, graph_module, modified)
        self.report = report
        return self


class QuaffPass(PassBase):
    """A pass takes its inputs at construction and returns a QuaffPassResult from ``call``."""

    name = "pass"


@dataclass
class PipelineResult:
    graph_module: GraphModule
    modified: bool
    reports: list[PassReport]


def run_passes(gm: GraphModule, passes: Sequence[Callable[[GraphModule], PassResult | None]]) -> PipelineResult:
    """Run ``passes`` in order; lint and recompile after each; collect reports. Plain fx passes (any
    callable returning a PassResult or None) may be mixed in; they get an empty report."""
    reports, modified = [], False
    for p in passes:
        result = p(gm)
        name = getattr(p, "name", getattr(p, "__name__", type(p).__name__))
        if result is None:
            result = PassResult(gm, True)
        gm = result.graph_module
        try:
            gm.graph.lint()
        except Exception as exc:
            raise QuaffError(f"pass {name!r} left an invalid graph: {exc}") from exc
        gm.recompile()
        modified |= bool(result.modified)
        reports.append(getattr(result, "report", None) or PassReport(name, notes=["no report (plain fx pass)"]))
    return PipelineResult(gm, modified, reports)
