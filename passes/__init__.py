"""quaff-fx graph passes (shipped as ``quaff_fx.passes``). Each is a ``torch.fx`` PassBase whose
``call(gm)`` returns a QuaffPassResult(graph_module, modified, report)."""
from .annotate_outliers import AnnotateOutliers, annotations
from .rewrite_linear import RewriteLinear

__all__ = ["AnnotateOutliers", "RewriteLinear", "annotations"]
from .fuse_scales import FuseScales, fuse_modules  # noqa: E402

__all__ += ["FuseScales", "fuse_modules"]
