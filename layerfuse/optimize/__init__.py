"""``layerfuse optimize``: search merges, pruning and attention removal for the best model that
meets a size/speed target within a quality limit, recovering the finalists within a budget."""

from layerfuse.optimize.request import OptimizeRequest
from layerfuse.optimize.search import STAGES, optimize
from layerfuse.optimize.space import DEFAULT_SPACE, SearchSpace, load_space, write_default_space
from layerfuse.optimize.targets import parse_budget, parse_limit, parse_target

__all__ = [
    "DEFAULT_SPACE",
    "STAGES",
    "OptimizeRequest",
    "SearchSpace",
    "load_space",
    "optimize",
    "parse_budget",
    "parse_limit",
    "parse_target",
    "write_default_space",
]
