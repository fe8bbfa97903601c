"""`dvc repro` end to end in a temporary copy of the repository, with tiny training params."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    CHROMIUM,
    TINY_TRAIN,
    edit_params,
    free_port,
    require_browser,
    run,
    runs_by_name,
    store_client,
    tool_env,
    wait_for,
)

from lstm_textgen.network import answers

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_then_nothing(repro_repo: tuple[Path, str]) -> None:
    repo, first_output = repro_repo
    for stage in ("init", "download", "prepare", "train", "evaluate", "sample", "register"):
        assert f"Running stage '{stage}'" in first_output
    stats = json.loads((repo / "metrics/prepare.json").read_text())
    assert stats["corpus"]["name"] == "shakespeare" and stats["vocab_size"] > 60
    assert (repo / "data/prepared/train.npy").stat().st_size > 4_000_000
    second = run(["dvc", "repro"], cwd=repo)
    # only `init` runs again (always_changed: it checks train.init_from), and it changes nothing
    assert re.findall(r"Running stage '([^']+)'", second.stdout) == ["init"]
    assert "didn't change, skipping" in second.stdout


def test_train_outputs_and_dvc_metrics(repro_repo: tuple[Path, str]) -> None:
    repo, _ = repro_repo
    metrics = json.loads((repo / "metrics/train.json").read_text())
    assert metrics["steps"] == TINY_TRAIN["max_steps"] and metrics["device"] == "cpu"
    # the periodic estimate is named apart from evaluate.json's whole-split val.loss
    assert metrics["window_val_loss_best"] > 0 and "best_val_loss" not in metrics
    assert (repo / "data/model/model.pt").is_file()
    history = (repo / "metrics/train_history.csv").read_text().splitlines()
    assert history[0].startswith("step,train_loss,val_loss") and len(history) == 3
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=repo).stdout)
    assert json.dumps(shown).count(metrics["mlflow_run_id"]) >= 1


def test_one_mlflow_run_in_the_repository_store(repro_repo: tuple[Path, str]) -> None:
    repo, _ = repro_repo
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    client = store_client(repo)
    experiment = client.get_experiment_by_name("lstm-textgen")
    assert experiment.artifact_location == (repo / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.params["model.hidden"] == "32" and logged.data.params["train.max_steps"] == "12"
    assert logged.data.tags["corpus"] == "shakespeare" and logged.data.tags["device"] == "cpu"
    assert len(logged.data.tags["git_commit"]) == 40
    val_curve = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in val_curve] == [6, 12]
    for name in ("train_loss", "val_perplexity", "val_bits_per_token", "lr", "tokens_per_sec"):
        assert len(client.get_metric_history(run_id, name)) == 2, name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss.png", "params.yaml", "vocab.json", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {
        "samples/samples.json",
        "samples/samples.txt",
    }
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    assert logged.data.metrics["eval.val.loss"] == pytest.approx(evaluated["val"]["loss"])
    assert logged.data.metrics["eval.test.bits_per_character"] == pytest.approx(
        evaluated["test"]["bits_per_token"]
    )


def test_evaluate_and_sample_outputs(repro_repo: tuple[Path, str]) -> None:
    repo, _ = repro_repo
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    for split in ("val", "test"):
        m = evaluated[split]
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
        assert m["bits_per_character"] == pytest.approx(m["loss"] / 0.69314718, rel=1e-6)
        assert 0 < m["accuracy"] < 1 and m["tokens"] > 200_000
    samples = json.loads((repo / "data/samples/samples.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert [s["prompt"] for s in samples] == params["sample"]["prompts"]
    assert all(len(s["text"]) == params["sample"]["length"] for s in samples)
    assert samples[0]["settings"]["seed"] == params["sample"]["seed"]
    assert (repo / "data/samples/samples.txt").read_text().startswith("=== prompt:")


def test_evaluate_figures_do_not_depend_on_the_training_dtype(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    """The evaluate stage reads in float32: its figures are the same whatever train.dtype says (a
    bf16 evaluation would make them depend on the machine's kernels)."""
    repo, _ = repro_repo
    figures = []
    for dtype in ("bfloat16", "float32"):
        params = edit_params(repo / "params.yaml", tmp_path / f"{dtype}.yaml", train={"dtype": dtype})
        assert params["train"]["dtype"] == dtype
        out = tmp_path / f"{dtype}.json"
        run(
            ["python", "stages/evaluate.py", "--params", str(tmp_path / f"{dtype}.yaml"), "--out", str(out)],
            repo,
        )
        figures.append(json.loads(out.read_text()))
    assert figures[0] == figures[1]
    assert figures[1] == json.loads((repo / "metrics/evaluate.json").read_text())


def test_ui_link_lands_on_the_runs_table(store: Path, tmp_path: Path) -> None:
    """`make ui` prints a link that opens the runs table, with the pipeline's run in it: MLflow 3
    rewrites a plain experiment link to its GenAI overview (traces, latency) in a fresh browser."""
    require_browser()
    from playwright.sync_api import sync_playwright

    run_id = json.loads((store / "metrics/train.json").read_text())["mlflow_run_id"]
    run_name = next(name for name, r in runs_by_name(store).items() if r.info.run_id == run_id)
    port, log = free_port(), tmp_path / "ui.log"
    with log.open("w") as output:
        command = ["lstm-textgen", "ui", "--port", str(port)]
        process = subprocess.Popen(command, cwd=store, env=tool_env(store), stdout=output, stderr=output)
    corpus = json.loads((store / "data/raw/corpus.json").read_text())
    try:
        wait_for(lambda: "ui: the runs table: " in log.read_text(), "the UI's link", process=process, log=log)
        link = log.read_text().split("ui: the runs table: ")[1].split()[0]
        assert answers(f"http://127.0.0.1:{port}")  # the link is printed once the UI answers, not before
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(link)
            page.wait_for_selector(f"text={run_name}", timeout=60_000)
            page.wait_for_timeout(1500)  # a redirect to the GenAI pages would have happened by now
            url, table = page.url, page.inner_text("body")
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "/runs" in url and "workflowType=machine_learning" in url, url
    # MLflow's own columns: the corpus as the run's dataset (name and digest), the script as its source
    assert f"{corpus['name']} ({corpus['text_sha256'][:32]})" in table, table[:2000]
    assert "train.py" in table.split("Source", 1)[1], table[:2000]
