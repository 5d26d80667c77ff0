"""`peftkit bench`: the protocol on a tiny BERT (deterministic cells, cache hits, resume, report files),
the method table's coverage of the registry, and named errors before any run."""
from __future__ import annotations

import html.parser
import json
from pathlib import Path

import pytest
from torch import nn

import peftkit
from peftkit.bench import (BENCH_METHODS, BenchConfigError, OutputDirError, UnknownMethodError, UnknownMetricError,
                           UnknownTaskError, load_task_file, plan_bench, run_bench)
from peftkit.bench.methods import FAMILIES, REFERENCES, all_rows, bench_method
from peftkit.bench.protocol import Progress, cell_spec
from peftkit.bench.tasks import BENCH_TASKS
from peftkit.bench.worker import run_cell
from peftkit.cli import main
from peftkit.core.config import METHODS, config_from_dict
from peftkit.methods import StructuredMask
from peftkit.methods.selective.selection import FisherSelected
from peftkit.models import load_efficientnet_lite0

from .bench_tiny import tiny_bert, write_task

@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return load_task_file(write_task(tmp_path_factory.mktemp("tiny-task")))


def _plan(task, output: Path, methods: list[str], **kw):
    return plan_bench("quick", tasks=[task.name], methods=methods, output=output, extra_tasks=[task], isolate=False, **kw)


def _quiet() -> Progress:
    return Progress(log=lambda message: None)


# --- the method table ------------------------------------------------------------------------------------


def test_every_registered_method_has_a_bench_entry_for_every_family() -> None:
    """A newly registered method fails here until it gets defaults or a skip reason per family."""
    for method in METHODS:
        assert method in BENCH_METHODS, f"{method} has no entry in peftkit/bench/methods.py"
        entry = BENCH_METHODS[method]
        for family in FAMILIES:
            assert (family in entry.defaults) != (family in entry.skips), f"{method} on {family}: defaults xor skip"
            if family in entry.defaults:
                config_from_dict(entry.config_fields(family, steps=40))  # validates
        assert entry.lrs, f"{method} has no learning rates"
        if entry.peft:
            assert hasattr(METHODS[method], "to_peft"), f"{method} is marked as in PEFT but cannot convert"
    variants = {name: entry.method for name, entry in BENCH_METHODS.items() if entry.method is not None}
    assert all(method in METHODS for method in variants.values()), variants
    assert set(BENCH_METHODS) == set(METHODS) | set(REFERENCES) | set(variants) == set(all_rows())


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _efficientnet() -> nn.Module:
    return load_efficientnet_lite0(num_classes=10)


def _tiny_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    return Dinov2ForImageClassification(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                     mlp_ratio=2, patch_size=4, image_size=16, num_labels=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_default_config_attaches_to_its_family(family: str) -> None:
    """The table's targets exist in each family's architecture (BERT, Llama, EfficientNet, Dinov2 names)."""
    build, head = {"bert": (lambda: tiny_bert(2)[0], ["classifier"]), "llama": (_tiny_llama, []),
                   "cnn": (_efficientnet, ["_fc"]), "vit": (_tiny_dinov2, ["classifier"])}[family]
    model = build()
    for name, entry in BENCH_METHODS.items():
        if name in REFERENCES or entry.skip_reason(family) is not None:
            continue
        config = config_from_dict({**entry.config_fields(family, steps=40), "modules_to_save": head})
        peftkit.attach(model, config, name="bench")
        if not isinstance(config, (FisherSelected, StructuredMask)):  # a selection on data trains nothing until it has chosen
            assert peftkit.summary(model).trainable > 0, f"{name} on {family} trains nothing"
        peftkit.remove(model, "bench")


def test_skipped_and_unconfigured_methods_get_rows_with_reasons(tmp_path) -> None:
    def never(spec, seed):
        raise AssertionError("a skipped method must not run")

    cnn_task = BENCH_TASKS["fashion-mnist"]
    plan = plan_bench("full", tasks=["fashion-mnist"], methods=["vera", "prompt_tuning"], output=tmp_path, isolate=False)
    reports, _ = run_bench(plan, run=never, progress=_quiet())
    rows = {row.method: row for row in reports[0].rows}
    assert rows["vera"].status == "skipped" and "Linear" in rows["vera"].reason
    assert rows["prompt_tuning"].status == "skipped" and "token" in rows["prompt_tuning"].reason
    assert cnn_task.family == "cnn"
    assert bench_method("lora").skip_reason("cnn") is None
    vit = plan_bench("quick", tasks=["fashion-mnist-vit"], methods=["prompt_tuning", "mam"], output=tmp_path / "vit",
                     isolate=False)
    rows = {row.method: row for row in run_bench(vit, run=never, progress=_quiet())[0][0].rows}
    assert BENCH_TASKS["fashion-mnist-vit"].family == "vit"
    assert all(rows[m].status == "skipped" and "a ViT reads pixels" in rows[m].reason for m in rows)


# --- cells: determinism, cache, resume ------------------------------------------------------------------


def test_a_cell_is_deterministic_for_a_fixed_seed(tiny_task) -> None:
    budget = tiny_task.budgets["quick"]
    spec = cell_spec(tiny_task, "lora", "peftkit", budget, lr=1e-2, timing_rounds=1)
    first, again, other = run_cell(spec, 0), run_cell(spec, 0), run_cell(spec, 1)
    assert first["status"] == "ok", first
    for key in ("val", "test", "trainable", "total", "saved_bytes", "steps"):
        assert first[key] == again[key], key
    assert first["steps"] == budget.steps and first["trainable"] == peftkit_lora_params(tiny_task)
    assert other["val"]["loss"] != first["val"]["loss"]  # the seed drives initialisation and data order


def peftkit_lora_params(task) -> int:
    """LoRA r=8 on query/value of 2 layers (64 wide) plus the copied 64->2 classifier head."""
    return 2 * 2 * 8 * (64 + 64) + (64 * 2 + 2)


def _table(markdown: str, title: str) -> list[list[str]]:
    """The rows (header first) of the Markdown table that follows `## title`."""
    section = markdown.split(f"## {title}", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines if not line.startswith("|---")]


class _Tables(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables, self.images = [], []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append(0)
        elif tag in ("td", "th"):
            self.tables[-1][-1] += 1
        elif tag == "img":
            self.images.append(dict(attrs)["src"])


def test_rerun_reads_every_cell_from_the_cache_and_the_report_is_well_formed(tiny_task, tmp_path) -> None:
    methods = ["lora", "fishmask", "llama_adapter", "linear-probe"]
    progress = _quiet()
    reports, paths = run_bench(_plan(tiny_task, tmp_path, methods), progress=progress)
    assert (progress.computed, progress.cached) == (3, 0)  # llama_adapter is skipped on BERT

    def fail(spec, seed):
        raise AssertionError(f"cell recomputed: {spec['method']} seed {seed}")

    progress_again = _quiet()
    reports_again, _ = run_bench(_plan(tiny_task, tmp_path, methods), run=fail, progress=progress_again)
    assert (progress_again.computed, progress_again.cached) == (0, 3)
    assert [r.scores for r in reports_again[0].rows] == [r.scores for r in reports[0].rows]

    markdown = paths["markdown"].read_text()
    table = _table(markdown, tiny_task.name)
    header, rows = table[0], table[1:]
    assert header[0] == "method" and "accuracy (mean ± std)" in header
    assert [row[0] for row in rows] == methods
    assert all(len(row) == len(header) for row in rows)
    ok = {row[0]: row for row in rows if not row[2].startswith(("skipped", "failed"))}
    assert set(ok) == {"lora", "fishmask", "linear-probe"}
    assert ok["lora"][2] == f"{peftkit_lora_params(tiny_task):,}"
    skipped = next(row for row in rows if row[0] == "llama_adapter")
    assert skipped[2].startswith("skipped: ") and "Llama" in skipped[2]

    parser = _Tables()
    parser.feed(paths["html"].read_text())
    assert len(parser.tables) == 1 and len(parser.tables[0]) == 1 + len(methods)
    assert all(cells == len(header) for cells in parser.tables[0])
    assert len(paths["plots"]) == 2 and sorted(parser.images) == sorted(p.name for p in paths["plots"])
    import matplotlib.image

    for plot in paths["plots"]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(plot).ndim == 3
    results = json.loads(paths["json"].read_text())
    assert [r["method"] for r in results["tasks"][0]["rows"]] == methods


def test_an_interrupted_run_resumes_from_its_cache(tiny_task, tmp_path) -> None:
    methods = ["lora", "bitfit", "linear-probe"]
    calls: list[str] = []

    def interrupted(spec, seed):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(spec["method"])
        return run_cell(spec, seed)

    with pytest.raises(KeyboardInterrupt):
        run_bench(_plan(tiny_task, tmp_path, methods), run=interrupted, progress=_quiet())
    assert calls == ["lora"] and not (tmp_path / "report.md").exists()
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # whole cells only, no temporary files left
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]

    resumed: list[str] = []

    def counting(spec, seed):
        resumed.append(spec["method"])
        return run_cell(spec, seed)

    progress = _quiet()
    reports, _ = run_bench(_plan(tiny_task, tmp_path, methods), run=counting, progress=progress)
    assert resumed == ["bitfit", "linear-probe"] and progress.cached == 1
    assert all(row.status == "ok" for row in reports[0].rows)


def test_a_failed_cell_is_one_table_line_and_is_retried_next_run(tiny_task, tmp_path) -> None:
    def broken(spec, seed):
        return {"status": "failed", "error": "RuntimeError: first line\n    second line"}

    _, paths = run_bench(_plan(tiny_task, tmp_path, ["lora"]), run=broken, progress=_quiet())
    assert _table(paths["markdown"].read_text(), tiny_task.name)[1][2] == "failed: RuntimeError: first line second line"
    assert not list((tmp_path / "cache").rglob("*.json"))  # not cached: the next run tries again


def test_a_changed_setting_is_a_new_cell(tiny_task) -> None:
    from peftkit.bench.cache import config_hash

    budget = tiny_task.budgets["quick"]
    base = config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 1e-2, 1))
    assert base == config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 1e-2, 1))
    assert base != config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 3e-3, 1))
    assert base != config_hash(cell_spec(tiny_task, "lora", "peft", budget, 1e-2, 1))
    from dataclasses import replace

    assert base != config_hash(cell_spec(tiny_task, "lora", "peftkit", replace(budget, steps=5), 1e-2, 1))


def test_a_changed_default_is_a_new_cell(tiny_task) -> None:
    """The bench leaves LoRA's dropout unset; when its default changes, cached cells no longer match."""
    from peftkit.bench.cache import config_hash
    from peftkit.methods import LoRA

    budget = tiny_task.budgets["quick"]
    before = config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 1e-2, 1))
    field = LoRA.model_fields["dropout"]
    original = field.default
    try:
        field.default = 0.25
        LoRA.model_rebuild(force=True)
        assert config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 1e-2, 1)) != before
    finally:
        field.default = original
        LoRA.model_rebuild(force=True)
    assert config_hash(cell_spec(tiny_task, "lora", "peftkit", budget, 1e-2, 1)) == before


def test_the_sweep_picks_the_best_validation_lr_and_reports_every_seed(tiny_task, tmp_path) -> None:
    """Fake cells: validation accuracy peaks at lr 1e-3; the test score varies by seed."""
    runs: list[tuple[float, int]] = []

    def fake(spec, seed):
        runs.append((spec["lr"], seed))
        val = {3e-3: 0.6, 1e-3: 0.9, 1e-2: 0.7}[spec["lr"]]
        return {"status": "ok", "val": {"accuracy": val, "loss": 1 - val}, "test": {"accuracy": 0.5 + 0.1 * seed,
                "loss": 0.5}, "trainable": 10, "total": 100, "saved_bytes": 1, "peak_bytes": 1, "samples_per_s": 1.0,
                "unmerged": 1.1, "merged": 1.0}

    plan = plan_bench("full", tasks=[tiny_task.name], methods=["lora"], output=tmp_path, extra_tasks=[tiny_task],
                      isolate=False)
    reports, _ = run_bench(plan, run=fake, progress=_quiet())
    row = reports[0].rows[0]
    assert runs == [(3e-3, 0), (1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-3, 2)]
    assert row.lr == 1e-3 and row.scores["accuracy"] == pytest.approx([0.5, 0.6, 0.7])
    assert row.mean("accuracy") == pytest.approx(0.6) and row.std("accuracy") == pytest.approx(0.1)
    assert row.sweep == {"0.003": 0.6, "0.001": 0.9, "0.01": 0.7}


def test_the_lr_count_takes_a_best_first_prefix_of_each_list(tiny_task, tmp_path) -> None:
    """`--standard` tries each method's first two lrs, `--lrs N` overrides any profile; 0 is refused."""
    def cells(profile: str, lrs: int | None) -> list[float]:
        runs: list[float] = []

        def fake(spec, seed):
            runs.append(spec["lr"])
            return {"status": "ok", "val": {"accuracy": 0.5, "loss": 0.5}, "test": {"accuracy": 0.5, "loss": 0.5},
                    "trainable": 10, "total": 100, "saved_bytes": 1, "peak_bytes": 1, "samples_per_s": 1.0,
                    "unmerged": 1.1, "merged": 1.0}

        plan = plan_bench(profile, tasks=[tiny_task.name], methods=["lora"], output=tmp_path / f"{profile}{lrs}",
                          extra_tasks=[tiny_task], isolate=False, seeds=1, lrs=lrs)
        run_bench(plan, run=fake, progress=_quiet())
        return runs

    lora_lrs = list(bench_method("lora").lrs)
    assert cells("standard", None) == lora_lrs[:2] and cells("quick", None) == lora_lrs[:1]
    assert cells("full", 2) == lora_lrs[:2] and cells("quick", 3) == lora_lrs[:3]
    assert "up to the first 2 lrs" in plan_bench("standard", output=tmp_path).describe()
    with pytest.raises(ValueError, match="lrs must be >= 1, got 0"):
        plan_bench("standard", output=tmp_path, lrs=0)


def test_compare_peft_runs_the_same_method_through_peft(tiny_task, tmp_path) -> None:
    reports, _ = run_bench(_plan(tiny_task, tmp_path, ["lora", "ssf"], compare_peft=True), progress=_quiet())
    rows = [(row.method, row.backend, row.status) for row in reports[0].rows]
    assert rows == [("lora", "peftkit", "ok"), ("lora", "peft", "ok"), ("ssf", "peftkit", "ok")]  # PEFT has no SSF
    ours, theirs = reports[0].rows[:2]
    assert ours.trainable == theirs.trainable and ours.merged is not None and theirs.merged is not None


def test_isolated_cells_run_in_a_fresh_process_and_measure_peak_memory(tiny_task, tmp_path) -> None:
    plan = plan_bench("quick", tasks=[tiny_task.name], methods=["lora"], output=tmp_path, extra_tasks=[tiny_task])
    assert plan.isolate
    reports, _ = run_bench(plan, progress=_quiet())
    row = reports[0].rows[0]
    assert row.status == "ok", row.reason
    assert row.peak_bytes > 0 and row.trainable == peftkit_lora_params(tiny_task)


# --- named errors before any run -----------------------------------------------------------------------------


def test_bad_requests_are_named_errors_before_any_cell_runs(tmp_path, capsys) -> None:
    with pytest.raises(UnknownMethodError, match="'lorra'.*did you mean 'lora'"):
        plan_bench(methods=["lorra"], output=tmp_path)
    with pytest.raises(UnknownTaskError, match="'bbc'.*did you mean 'bbc-news'"):
        plan_bench(tasks=["bbc"], output=tmp_path)
    with pytest.raises(UnknownMetricError, match="'f1'"):
        plan_bench(metric="f1", output=tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="a-file"):
        plan_bench(output=blocker / "report")
    assert issubclass(OutputDirError, BenchConfigError) and issubclass(BenchConfigError, ValueError)
    assert main(["bench", "--quick", "--methods", "lora", "nope", "--output", str(tmp_path / "out")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cache").exists()


def test_a_bad_task_file_is_a_named_error(tmp_path) -> None:
    with pytest.raises(UnknownTaskError, match="does not exist"):
        load_task_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: classify-text\nmodel: minilm\ndata: {train: x.csv}\nbudgett: {}\n")
    with pytest.raises(BenchConfigError, match="'budgett'.*did you mean 'budget'"):
        load_task_file(bad)
    bad.write_text("name: x\ntask: classify-text\nmodel: my-model\ndata: {train: x.csv}\n")
    with pytest.raises(BenchConfigError, match="family"):
        load_task_file(bad)
    bad.write_text(f"name: x\ntask: classify-text\nmodel: minilm\ndata: {{train: {tmp_path / 'missing.csv'}}}\n")
    with pytest.raises(BenchConfigError, match="missing.csv"):
        load_task_file(bad)
