"""Learning on real data: UniPELT, MAM and the S4 spindle layer-group design on MiniLM + BBC News.

Each design trains with a fresh copy of the classifier head through `run_training` (tests/bbc.py): a fresh head is
near chance, and the trained design reaches the accuracy every method's learning test is held to (LEARNS). `fit_bbc`
also holds it to the controls (`assert_beats_controls`): the head alone at the same learning rate, + MARGIN (0.05),
with lower training losses, and a drop of at least DROP (0.05) when the adapter is switched off. The table of these
numbers is benchmarks/bench_hybrid.py's: docs/hybrid.md."""
from __future__ import annotations

import pytest

import peftkit
from peftkit.methods import MAM, UniPELT
from peftkit.methods.hybrid import s4_model

from .bbc import LEARNS, fit_bbc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# measured (docs/hybrid.md): UniPELT 0.905 and S4 0.910 at 1e-2, MAM 0.875 at 3e-3 (its scaled adapter diverges at 1e-2)
LR_UNIPELT, LR_MAM, LR_S4 = 1e-2, 3e-3, 1e-2


@pytest.mark.parametrize("config, lr", [(UniPELT(), LR_UNIPELT), (MAM(), LR_MAM), (s4_model(), LR_S4)],
                         ids=["unipelt", "mam", "s4-spindle"])
def test_hybrid_design_learns_bbc_topics(config: peftkit.AdapterConfig, lr: float) -> None:
    result, _, _ = fit_bbc(config, lr=lr)
    assert result.accuracy_before < 0.45  # a fresh head: near chance (0.2)
    assert result.accuracy_after >= LEARNS
