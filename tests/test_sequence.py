"""UnlearnCanvas' sequential unlearning in `erasure bench toycanvas --sequence FILE` (benchmarks/sequence.py): a
chain of `erase --base-edit` steps per method, each scored on every concept erased so far and checked against
scoring the step's edit directly; a killed run resumes the chain from its last finished step, a rerun recomputes
nothing, a failed step ends its chain, and a cluster run submits one erase job per chain. The bad inputs are rows
of apps/bad_input_cases/sequence.py."""

import json
from pathlib import Path

import pytest

from apps.cli import main
from benchmarks.toycanvas.benchmark import toycanvas_benchmark
from erasers.errors import FailedEdit

SEQUENCE = ["arrow", "star", "circle"]
OBJECTS, STYLES = ["arrow", "star", "circle", "moon"], ["Flat", "Stripes"]  # moon and the styles are kept


def sequence_file(tmp_path: Path, names=SEQUENCE) -> str:
    path = tmp_path / "sequence.txt"
    path.write_text("# erased in this order\n" + "\n\n".join(names) + "\n")
    return str(path)


def bench(out: Path, *argv: str) -> int:
    return main(["bench", "toycanvas", "--objects", ",".join(OBJECTS), "--styles", ",".join(STYLES), "--no-fid",
                 "--quiet", "--out", str(out), *argv])


def steps(out: Path) -> dict[str, dict]:
    return {row["set"]: row for row in json.loads((out / "results.json").read_text())["rows"] if "step" in row}


def interrupt_at(monkeypatch, step_name: str, error: BaseException) -> None:
    """The benchmark's erase of `step_name` raises `error` (a kill: KeyboardInterrupt; a divergence: FailedEdit)."""
    import benchmarks.erasure_bench as erasure_bench

    erase = erasure_bench.erase_isolated

    def erase_or_raise(model, method, concepts, out, *args, **kwargs):
        if Path(out).name == step_name:
            raise error
        return erase(model, method, concepts, out, *args, **kwargs)

    monkeypatch.setattr(erasure_bench, "erase_isolated", erase_or_raise)


@pytest.mark.heavy
def test_a_sequence_is_a_chain_per_method_scored_on_every_concept_so_far(tmp_path, monkeypatch, capsys):
    out, order = tmp_path / "run", sequence_file(tmp_path)
    argv = ["--methods", "uce", "--sequence", order]
    interrupt_at(monkeypatch, "uce-seq2-star", KeyboardInterrupt())
    assert bench(out, *argv) == 130  # killed during uce's second step
    assert (out / "edits" / "uce-seq1-arrow" / "erasure.json").exists()
    monkeypatch.undo()
    capsys.readouterr()

    assert bench(out, *argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    erased = [line for line in printed.splitlines() if line.startswith("erasing")]
    assert not any(line.startswith("erasing arrow with uce") for line in erased), "the chain goes on from step 2"
    assert f"erasing star with uce after uce-seq1-arrow -> {out / 'edits' / 'uce-seq2-star'}" in erased, erased

    names = [f"uce-seq{k}-{concept}" for k, concept in enumerate(SEQUENCE, 1)]
    meta = json.loads((out / "edits" / names[2] / "erasure.json").read_text())
    assert meta["concepts"] == SEQUENCE and meta["step_concepts"] == ["circle"]
    assert [(p["path"], p["method"], p["concepts"]) for p in meta["parents"]] == [
        (str((out / "edits" / names[0]).resolve()), "uce", ["arrow"]),
        (str((out / "edits" / names[1]).resolve()), "uce", ["star"])]
    rows = steps(out)
    assert list(rows) == names
    for k, name in enumerate(names, 1):
        row = rows[name]
        assert row["step"] == k and row["sequence"] == SEQUENCE and row["concepts"] == SEQUENCE[:k]
        assert list(row.get("UA_per_concept", {row["concepts"][0]: None})) == SEQUENCE[:k]
    results = json.loads((out / "results.json").read_text())
    assert [line["method"] for line in results["table"]] == ["base"], "the steps have their own table"

    # Step 3's row against scoring its edit directly: the arrow's UA alone, IRA / CRA of all three erased.
    from benchmarks.toycanvas import CLASSIFIER_DIR
    from benchmarks.toycanvas.classifier import ToyClassifier
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score
    from erasers.edits import apply_edits
    from erasers.models import load_pipeline

    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out / "edits" / "uce-seq3-circle"])
    records, _ = classify_answer_set(loaded, ToyClassifier.from_pretrained(CLASSIFIER_DIR),
                                     AnswerSet(tuple(OBJECTS), tuple(STYLES), (188,)), progress=False)
    third = steps(out)["uce-seq3-circle"]
    assert third["UA_per_concept"]["arrow"] == score(records, ["arrow"], "object")["UA"]
    (together,), direct = third["per_concept"].values(), score(records, SEQUENCE, "object")
    assert (together["IRA"], together["CRA"]) == (direct["IRA"], direct["CRA"])

    report = (out / "report.md").read_text()
    assert "## Sequential" in report
    assert "| Method | Step | arrow UA % | star UA % | circle UA % | IRA % | CRA % |" in report
    first = f"| uce | 1 | {100 * steps(out)['uce-seq1-arrow']['per_concept']['arrow']['UA']:.1f} |  |  |"
    assert first in report and first in printed, "blank before a concept is erased"
    assert (out / "plots" / "sequence_UA.png").stat().st_size > 1000

    manifest = (out / "manifest.jsonl").read_text()
    assert bench(out, *argv) == 0
    assert "erasing" not in capsys.readouterr().out and (out / "manifest.jsonl").read_text() == manifest, \
        "a rerun recomputes nothing"


@pytest.mark.heavy
def test_a_failed_step_ends_its_chain_and_its_later_steps_are_failed_rows(tmp_path, monkeypatch, capsys):
    out, order = tmp_path / "run", sequence_file(tmp_path)
    argv = ["--methods", "negprompt", "--sequence", order]
    interrupt_at(monkeypatch, "negprompt-seq2-star", FailedEdit("non-finite weights: the erase diverged"))
    assert bench(out, *argv) == 0, capsys.readouterr().err[-2000:]
    rows = steps(out)
    assert "failed" not in rows["negprompt-seq1-arrow"]
    assert rows["negprompt-seq2-star"]["failed"] == "non-finite weights: the erase diverged"
    assert rows["negprompt-seq3-circle"]["failed"] == "not erased: step 2 (negprompt-seq2-star) failed"
    assert not (out / "edits" / "negprompt-seq3-circle").exists()
    assert "| negprompt (failed: not erased: step 2" in (out / "report.md").read_text()
    capsys.readouterr()
    monkeypatch.undo()
    assert bench(out, *argv) == 0
    assert "erasing" not in capsys.readouterr().out, "a failed step is recorded: the chain is not erased again"


def test_a_cluster_run_submits_one_erase_job_per_chain(tmp_path):
    from benchmarks.cluster import Planner, WorkLeft, roles
    from benchmarks.erasure_bench import run
    from benchmarks.runner import Runner

    bench_ = toycanvas_benchmark(OBJECTS, STYLES, fid=False)
    out = tmp_path / "run"
    with pytest.raises(WorkLeft) as left:
        run(bench_, ["uce", "negprompt"], ["moon"], [], out, Runner(out, Planner(), progress=False),
            sequence=SEQUENCE)
    erases = [str(role) for role in roles(left.value.pending, 2) if role.lock]
    assert erases == ["erase uce-moon", "erase negprompt-moon", "erase uce-sequence", "erase negprompt-sequence"]
