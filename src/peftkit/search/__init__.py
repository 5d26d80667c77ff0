"""`peftkit search`: a budgeted search over per-layer-group PEFT designs (docs/hybrid.md, "Design search")."""
from .report import SearchReport, TrialRecord
from .space import SearchError, SearchSection
from .study import run_search, search_config

__all__ = ["SearchError", "SearchReport", "SearchSection", "TrialRecord", "run_search", "search_config"]
