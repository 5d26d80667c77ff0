"""Tiny random models shared by the tests (no downloads: built from configs), and the skip policy for CI."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs pytest on a file of its own


class SkipsFailCI:
    """With the environment variable CI set, any skipped test fails the run and is listed.

    CI installs every extra (peft included), so there a skip can only hide a failure: a broken import, a missing
    bundled model. Locally a skip stays a skip (a machine without peft skips only the tests marked needs_peft)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append(f"{report.nodeid}: {reason}")

    pytest_runtest_logreport = pytest_collectreport = _note

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.skipped:
            terminalreporter.section("skipped tests fail under CI", red=True)
            for line in self.skipped:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        config.pluginmanager.register(SkipsFailCI(), "skips-fail-ci")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, each worker (and what it starts: bench cells, torchrun) gets its share of the cores; torch's
    default, every core in every process, would oversubscribe them with spinning OpenMP threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Linear layers with sibling q/k/v (shared input), an FFN, a conv and an embedding."""

    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d, bias=False)})
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # [B, T, d]
        q, k, v = (self.attn[n](h) for n in "qkv")
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + att @ v
        h = h + self.ffn(h)
        return self.head(h.mean(1))  # [B, 3]


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (6, 5))


def randomize(model: nn.Module, name: str | None = None, scale: float = 0.3) -> None:
    """Give adapter parameters non-zero values so an adapter really changes outputs."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            pname = f".{pname}"  # a root delta's parameters (prompts, prefixes) start with "peftkit."
            if ".peftkit." in pname and (name is None or f".peftkit.{name}." in pname):
                p.copy_(torch.randn_like(p) * scale)
