"""Shared fixtures: the shared corpora, a real HTTP server on 127.0.0.1, and temporary repo copies."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch
import yaml

from lstm_textgen.data.tokenisers import CharVocabulary, Vocabulary, WordVocabulary
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.network import free_port
from lstm_textgen.params import ModelParams, Params, parse_params
from lstm_textgen.tracking.store import file_lock

# as `make test` sets it (Makefile, SUITE_ENV): here for the processes a bare `pytest` starts
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parents[1]
CORPORA_DIR = Path(os.environ.get("LSTM_TEXTGEN_CORPORA", REPO_ROOT.parent / "shared" / "corpora"))
# Longest first (by each module's time in a whole `make test`), so that `make test`'s pytest-xdist
# workers (--dist loadfile: a module's fixtures are built once, on one worker) start on the pipeline
# runs and share out the quick tests at the end: a long module started late leaves the others idle.
# (--dist loadgroup would keep test_pipeline and test_serving's repro_repo on one worker, but xdist 3.8
# cannot tag node ids under pytest 9.2, which renamed Node._nodeid, so every group was split.)
LONGEST_FIRST = (
    "test_server.py",
    "test_presets.py",
    "test_tune.py",
    "test_experiments.py",
    "test_distributed.py",
    "test_interrupted.py",
    "test_levels.py",
    "test_own_process.py",
    "test_finetune.py",
    "test_slurm.py",
    "test_bench.py",
    "test_dvc_remote.py",
    "test_drain.py",
    "test_pipeline.py",
    "test_demo.py",
    "test_batcher.py",
    "test_serving.py",
    "test_openai_server.py",
    "test_fuzz_serving.py",
    "test_tracking.py",
    "test_model_training.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    if not (CORPORA_DIR / "manifest.json").is_file():
        message = f"shared corpora not found at {CORPORA_DIR} (set LSTM_TEXTGEN_CORPORA)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has ../shared beside the clone: never skip silently there
        pytest.skip(message)
    return CORPORA_DIR


class _CorpusHandler(http.server.BaseHTTPRequestHandler):
    """/files/NAME serves a file; /truncate/NAME closes mid-body; /slow/NAME stalls before answering;
    /flaky/NAME answers 503 the first time; /status/CODE answers CODE."""

    root: Path
    seen: dict[str, int]

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        _, kind, name = self.path.split("/", 2)
        self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if kind == "status":
            self.send_error(int(name))
            return
        if kind == "flaky" and self.seen[self.path] == 1:
            self.send_error(503)
            return
        path = self.root / name
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if kind == "slow":
            time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout tests)
            self.close_connection = True


@contextlib.contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 serving the files of `root` (see _CorpusHandler)."""
    handler = type("Handler", (_CorpusHandler,), {"root": root, "seen": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def corpus_server(corpora_dir: Path) -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 serving the shared corpora."""
    with file_server(corpora_dir) as url:
        yield url


@contextlib.contextmanager
def model_server(store: Path, model_uri: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow models serve` of `model_uri` from the store in `store`; its base URL."""
    port = free_port()
    env = tool_env(store) | (extra_env or {})
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    command = ["mlflow", "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port)]
    # its log goes to a file: a pipe nobody reads fills up and blocks the server mid-request
    log = Path(tempfile.mkstemp(prefix="model-server-", suffix=".log")[1])
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--env-manager", "local"], cwd=store, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_page(process, f"{url}/ping", log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.unlink(missing_ok=True)


def tool_env(repo: Path | None = None) -> dict[str, str]:
    """Environment for running the project's commands as a user would: the venv's tools on PATH,
    the repo copy's own sources importable, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(var, None)
    if repo is not None:
        env["PYTHONPATH"] = str(repo / "src")
    return env


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding the working tree's files (tracked and untracked, not ignored)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, check=True)
    for key, value in (("user.name", "test"), ("user.email", "test@example.invalid")):  # dvc exp commits too
        subprocess.run(["git", "config", key, value], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


def run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=env or tool_env(cwd), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# a tiny character vocabulary and untrained models over it, for generation and scoring
CHAR_TEXT = "hello world, this is a tiny text.\n"


@pytest.fixture(scope="module")
def char_vocab() -> Vocabulary:
    return build_vocabulary(CHAR_TEXT, "char", lowercase=False)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def char_model(request, char_vocab: Vocabulary) -> RecurrentLM:
    torch.manual_seed(0)
    shape = ModelParams(cell=request.param, layers=2, hidden=24, embedding_dim=8)
    return RecurrentLM(len(char_vocab), shape).eval()


def run_at_once(
    script: str, arguments: list[list[str]], cwd: Path, env: dict[str, str], delay: float, timeout: float
) -> list[subprocess.CompletedProcess[str]]:
    """One `python -c script START *args` per entry of `arguments`, all started now; each script
    sleeps until START (`time.time()` + `delay`, past its imports) so that their work meets at one
    moment. Their results, in order."""
    start = str(time.time() + delay)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, start, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arguments
    ]
    outputs = [process.communicate(timeout=timeout) for process in processes]
    return [
        subprocess.CompletedProcess(process.args, process.returncode, out, err)
        for process, (out, err) in zip(processes, outputs, strict=True)
    ]


PACED_SCRIPT = """import runpy, sys, time
from torch.optim.optimizer import register_optimizer_step_pre_hook
pause, sys.argv = float(sys.argv[1]), sys.argv[2:]
register_optimizer_step_pre_hook(lambda *_: time.sleep(pause))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def paced(script: str, pause: float = 0.1) -> list[str]:
    """`python script` whose every optimizer step first sleeps `pause` seconds: for a training that only
    has to last through something timed by the clock (an outage), which otherwise spends a core on steps
    nobody reads and a server's time on their metrics. The steps themselves are the stage's own."""
    return [sys.executable, "-c", PACED_SCRIPT, str(pause), script]


def train_stage_command(params: Path, out: Path) -> list[str]:
    """`python stages/train.py` on `params`, its outputs under `out`: model/, last.pt, metrics/."""
    return [
        sys.executable,
        "stages/train.py",
        "--params",
        str(params),
        "--out",
        str(out / "model"),
        "--resume-from",
        str(out / "last.pt"),
        "--metrics",
        str(out / "metrics"),
    ]


def store_client(store: Path | str):
    """An MLflow client on a store: a repo copy (its mlflow.db beside dvc.yaml), a .db file, or a URI."""
    from mlflow.tracking import MlflowClient

    if isinstance(store, Path):
        store = f"sqlite:///{store if store.suffix == '.db' else store / 'mlflow.db'}"
    return MlflowClient(tracking_uri=store)


def runs_by_name(store: Path | str) -> dict[str, object]:
    """The runs of the store's `lstm-textgen` experiment, by run name."""
    client = store_client(store)
    experiment = client.get_experiment_by_name("lstm-textgen")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key, nested sections merged rather than replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def edit_params(source: Path, dest: Path | None = None, **sections: dict) -> dict:
    """params.yaml at `source` with `sections` merged in (`train={"lr": 0.01}`), written to `dest`
    (default: back to `source`); the params, as a dict."""
    params = merged(yaml.safe_load(source.read_text()), sections)
    (dest or source).write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def tiny_params(**sections: dict) -> Params:
    """Validated params that train a tiny model on the CPU in a second, `sections` merged in."""
    return parse_params(merged(TINY_PARAMS, sections))


def assert_same_training(a: dict, b: dict, exact: bool = False) -> None:
    """Two checkpoints: the same step, weights and curve, bit for bit (`exact`) or to float tolerance
    (sums over ranks add in another order than one process's; AdamW's normalised steps carry such
    last-bit differences into the weights at about 1e-5 of their size after 20 steps)."""
    assert a["step"] == b["step"]
    for key, weights in a["model"].items():
        if exact:
            assert torch.equal(weights, b["model"][key]), key
        else:
            torch.testing.assert_close(weights, b["model"][key], rtol=1e-4, atol=2e-5, msg=key)
    for ours, theirs in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=0 if exact else 1e-5), key


TINY_TRAIN = {"max_steps": 12, "eval_every": 6, "eval_batches": 2, "batch_size": 8, "warmup_steps": 2}
TINY_MODEL = {"layers": 1, "hidden": 32, "embedding_dim": 16}
# In-process training (tests that call the library): one thread, float32, reproducible on any CPU.
TINY_PARAMS = {
    "data": {"seq_len": 16, "val_fraction": 0.1, "test_fraction": 0.1},
    "model": TINY_MODEL,
    "train": {
        **TINY_TRAIN,
        "max_steps": 30,
        "eval_every": 10,
        "warmup_steps": 5,
        "lr": 0.01,
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
    },
}


def tiny_repo(dest: Path) -> Path:
    """A repo copy whose params train in seconds: same code, same pipeline, smaller numbers."""
    repo = copy_repo(dest)
    edit_params(repo / "params.yaml", train=TINY_TRAIN, model=TINY_MODEL, data={"seq_len": 32})
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"], cwd=repo)
    return repo


def prepared_tiny_repo(repro_repo: tuple[Path, str], dest: Path, **sections: dict) -> Path:
    """A tiny repo with its corpus prepared and `sections` merged into its params (committed): a copy
    of the shared repro_repo, whose `prepare` outputs are the ones `dvc repro prepare` would make, so
    `sections` may not change what prepare reads."""
    if {"data", "corpora"} & set(sections):
        raise ValueError("data and corpora settings change the prepared corpus: use tiny_repo + dvc repro")
    repo = copy_of_repro_repo(repro_repo, dest)
    for path in outputs_after_prepare(repo):  # as after `dvc repro prepare`: nothing trained yet
        path.unlink(missing_ok=True)
    if sections:
        edit_params(repo / "params.yaml", **sections)
        run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "test params"], cwd=repo)
    return repo


def outputs_after_prepare(repo: Path) -> list[Path]:
    """The files that dvc.yaml's stages after `prepare` write (train, evaluate, sample, register)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    later = list(stages)[list(stages).index("prepare") + 1 :]
    kinds = ("outs", "metrics", "plots")
    listed = [out for name in later for kind in kinds for out in stages[name].get(kind, [])]
    return [repo / (out if isinstance(out, str) else next(iter(out))) for out in listed]


@pytest.fixture(scope="session")
def repro_repo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[Path, str]:
    """A tiny repo after its first `dvc repro`, and what that printed: built once per test run. The
    first pytest-xdist worker to ask builds it in the run's shared temporary folder under a file lock;
    the others wait for the lock and share it (the pattern pytest-xdist documents). Tests only read
    it, or write beside it (their own params and outputs in tmp_path)."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    built = shared / "repro_repo.json"
    with file_lock(shared / "repro_repo.lock"):
        if not built.exists():
            repo = tiny_repo(shared / "repro_repo" / "repo")
            first = run(["dvc", "repro"], cwd=repo)
            built.write_text(json.dumps({"repo": str(repo), "stdout": first.stdout}))
    recorded = json.loads(built.read_text())
    return Path(recorded["repo"]), recorded["stdout"]


# the shared store and DVC's own scratch space stay with the shared repo
NOT_COPIED = {"mlflow.db", "mlflow.db.lock", "mlruns", "mlflow-pending", "optuna.db"}


def copy_of_repro_repo(repro_repo: tuple[Path, str], dest: Path) -> Path:
    """A repo of one's own, already past its first `dvc repro`: the shared repro_repo's outputs, DVC
    cache and dvc.lock, without its MLflow store (the copy's runs are its own): a pipeline's worth of
    CPU saved for each test that would otherwise start with `dvc repro`."""
    source, _ = repro_repo

    def ignored(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == source:
            return NOT_COPIED & set(names)
        return {"tmp"} & set(names) if Path(folder) == source / ".dvc" else set()

    shutil.copytree(source, dest, symlinks=True, ignore=ignored)
    return dest


@pytest.fixture
def full_disk() -> Path:
    """A 64 KiB tmpfs: a real disk that fills up (needs the right to mount, as root in CI's container)."""
    mount = Path(f"/tmp/lstm-textgen-full-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
    mount.rmdir()


# --- a real browser: Debian's chromium, driven by Playwright, with the network cut ---

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "file://", "data:", "blob:")


def require_installed(path: Path, package: str) -> None:
    """Under CI a missing Debian package fails the test (`make test` installs it); elsewhere it skips."""
    if path.exists():
        return
    message = f"no {path}: `make test` installs it (apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_browser() -> None:
    require_installed(CHROMIUM, "chromium")


def offline(route, refused: list[str]) -> None:
    if route.request.url.startswith(LOCAL):
        route.continue_()
    else:
        refused.append(route.request.url)
        route.abort()


def wait_for(
    condition: Callable[[], object],
    what: str,
    timeout: float = 120,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
    pause: float = 0.05,
) -> None:
    """Poll `condition` until it holds. Fails loudly, naming `what` (and the tail of `log`), at the
    deadline or as soon as `process`, which was to bring it about, has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > deadline:
            why = (
                f"its process ended with exit code {process.returncode}" if ended else f"{timeout:g} s passed"
            )
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"waited for {what}, but {why}\n{tail}")
        time.sleep(pause)


def page_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def wait_for_page(process: subprocess.Popen, url: str, log: Path) -> str:
    wait_for(lambda: page_ok(url), f"{url} to answer 200", process=process, log=log, pause=0.5)
    return url


@contextlib.contextmanager
def tracking_store(repo: Path) -> Iterator[None]:
    """MLflow pointed at a repo copy's store in this process (its process-wide setting, which wins
    over the environment), and back to what it was afterwards: tests of several stores share a worker."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture()
def scratch_run(store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A finished run in an experiment of its own (MLFLOW_EXPERIMENT_NAME) in the shared pipeline's
    store, for a test that registers versions there: `register` reopens the run it logs into, and the
    pipeline's training run must stay FINISHED, and alone in its experiment, for other workers' tests."""
    name = f"test-registrations-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    client = store_client(store)
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    client.set_terminated(run_id)
    return run_id


@pytest.fixture()
def store(repro_repo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The pipeline's repo copy as the working directory, its MLflow store the tracking URI (of this
    process, and of the commands it starts)."""
    repo, _ = repro_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.chdir(repo)
    with tracking_store(repo):
        yield repo


# --- small datasets built in memory (the pipeline prepares its own by streaming: preparation.py) ---


def build_vocabulary(
    tokens, level: str, lowercase: bool, min_freq: int = 1, max_size: int | None = None
) -> Vocabulary:
    """A vocabulary of a text's tokens: char level every character, word level the frequent words."""
    import collections

    counts = collections.Counter(tokens)
    if level == "char":
        return CharVocabulary(tuple(sorted(counts)), lowercase)
    return WordVocabulary.from_counts(counts, lowercase, min_freq, max_size)


def split_ids(ids, val_fraction: float, test_fraction: float) -> dict:
    """Contiguous views train | val | test, sized as the prepare stage sizes them."""
    from lstm_textgen.data.windows import split_sizes

    sizes = split_sizes(len(ids), val_fraction, test_fraction)
    a, b = sizes.train, sizes.train + sizes.val
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


def write_dataset(dataset, out_dir: Path) -> None:
    """A prepared directory (splits, vocab.json, splits.json) as the prepare stage leaves it."""
    from lstm_textgen.data.dataset import SPLITS_FILE, VOCAB_FILE
    from lstm_textgen.data.windows import save_split
    from lstm_textgen.files import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, ids in dataset.splits.items():
        save_split(out_dir / f"{name}.npy", ids)
    write_json(out_dir / VOCAB_FILE, dataset.vocab.to_dict())
    if "splits" in dataset.stats:
        write_json(out_dir / SPLITS_FILE, dataset.stats["splits"])
