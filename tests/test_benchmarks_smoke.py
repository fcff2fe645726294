"""The benchmark scripts still run: each one, in a tiny configuration, prints one valid JSON line with the keys the
results table (`benchmarks/run_all.py`) reads, and the table renders from them. No timing is asserted: the figures
themselves are the scripts' business (`python benchmarks/run_all.py`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS: dict[str, dict] = {}  # run_all's job name -> the script's JSON, for the table test at the end


def load(script: str) -> ModuleType:
    """Import `benchmarks/<script>.py` under a private name (the folder is not a package); the scripts import each
    other by plain name, as when run (`python benchmarks/<script>.py` puts their folder first on the path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_smoke_{script}", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _engine_logger_enabled():
    """The scripts silence the `accelengine` logger while they time: enable it again for the tests after them (its
    handlers and propagation are restored for every test by `tests/conftest.py`)."""
    logger = logging.getLogger("accelengine")
    disabled = logger.disabled
    yield
    logger.disabled = disabled


@pytest.fixture
def fresh_accelerate_state():
    """`gpu_lm` runs its engine in bf16, and Accelerate keeps one precision per process: start from a fresh state,
    and leave one behind for the tests after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run_main(script: str, args: list[str], capsys, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    load(script).main()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, f"{script} --json printed more than its JSON line: {out[:3]}"
    return json.loads(out[0])


CASES = {
    "overhead_tiny": (
        "overhead",
        ["--steps", "3", "--rounds", "1", "--warmup", "2", "--hidden", "8"],
        {"raw_us", "accelerate_us", "engine_us", "engine_bare_us", "engine_vs_raw", "engine_vs_raw_paired"}
        | {"engine_bare_vs_raw_paired", "engine_vs_accelerate", "engine_vs_accelerate_paired", "hidden", "warmup"}
        | {"engine_vs_raw_paired_ci95", "engine_bare_vs_raw_paired_ci95", "engine_vs_accelerate_paired_ci95"}
        | {"raw_again_us", "raw_again_vs_raw_paired", "raw_again_vs_raw_paired_ci95"}
        | {"raw_lean_us", "engine_vs_raw_lean_paired", "engine_bare_vs_raw_lean_paired_ci95"},
    ),
    "data": (
        "data_throughput",
        ["--samples", "512", "--rounds", "1"],
        {"hf_table_samples_per_s", "tensor_dataset_samples_per_s", "tensor_dataset_plain_loader_samples_per_s"}
        | {"hf_vs_tensor_dataset", "hf_vs_tensor_dataset_paired", "hf_vs_tensor_dataset_paired_ci95", "samples"}
        | {"tensor_dataset_again_samples_per_s", "tensor_dataset_again_vs_tensor_dataset_paired"}
        | {"tensor_dataset_again_vs_tensor_dataset_paired_ci95"}
        | {"features", "batch", "rounds"},
    ),
    "checkpoint": (
        "checkpoint_figures",
        ["--params", "20000", "--runs", "1"],
        {"state_mb", "params", "runs", "median_s", "save_ratio", "load_ratio", "load_baseline", "resume_ratio"}
        | {"save_ratio_paired", "load_ratio_paired"}
        | {"load_ratio_vs_touched", "load_ratio_vs_lazy_mmap", "save_ratio_of_minimums", "load_ratio_of_minimums"}
        | {"save_mb_per_s", "load_mb_per_s", "verify_mb_per_s"},
    ),
    "gpu_lm": (
        "gpu_lm",
        ["--tiny", "--steps", "3", "--warmup", "2", "--rounds", "1"],
        {"hand_written_tokens_per_s", "engine_tokens_per_s", "engine_vs_hand_written", "engine_vs_hand_written_paired"}
        | {"sync_free_steps", "device", "params", "tokens_per_step", "tiny"},
    ),
    "resume_skip": (
        "resume_skip",
        ["--batches", "50", "--rounds", "1"],
        {"batches", "batch_size", "samples", "rounds", "resume_at_0_s", "resume_at_n_s", "resume_n_minus_0_s"}
        | {"resume_n_vs_0", "construct_s", "load_n_batches_s"},
    ),
}


@pytest.mark.parametrize("job", list(CASES))
def test_script_prints_json_with_the_expected_keys(job, capsys, monkeypatch, request):
    if job == "data":
        pytest.importorskip("datasets")
    if job == "gpu_lm":
        request.getfixturevalue("fresh_accelerate_state")
    script, args, keys = CASES[job]
    result = run_main(script, [*args, "--json"], capsys, monkeypatch)
    assert keys <= set(result), f"{script} lost keys: {sorted(keys - set(result))}"
    for key in (k for k in keys if k.endswith("_ci95")):  # an interval around the median it belongs to
        low, high = result[key]
        assert low <= result[key.removesuffix("_ci95")] <= high, (key, result[key])
    RESULTS[job] = result


@pytest.mark.gpu
def test_gpu_lm_steps_between_log_steps_never_synchronise(capsys, monkeypatch, fresh_accelerate_state):
    """On CUDA the engine's steps between two log steps run under `set_sync_debug_mode("error")`: a hidden
    host-device synchronisation (a `.item()`, a blocking copy) would raise and fail the run."""
    args = ["--tiny", "--steps", "60", "--warmup", "2", "--rounds", "1", "--json"]
    result = run_main("gpu_lm", args, capsys, monkeypatch)
    assert result["device"] != "cpu" and result["sync_free_steps"] >= 100  # steps 50..150 of a 150-step run


def test_checkpoint_figures_time_every_baseline(capsys, monkeypatch):
    result = RESULTS.get("checkpoint") or run_main(
        "checkpoint_figures", ["--params", "20000", "--runs", "1", "--json"], capsys, monkeypatch
    )
    assert {"save", "save_plain", "load", "load_plain_mmap", "load_plain_touched", "resume", "verify"} <= set(
        result["median_s"]
    )


@pytest.mark.slow
def test_startup_prints_json_with_the_expected_keys(capsys, monkeypatch):
    """Fresh processes: the two imports and one CLI run to its first step (about 8 s)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("datasets")
    result = run_main("startup", ["--rounds", "1", "--cli-rounds", "1", "--no-bare", "--json"], capsys, monkeypatch)
    keys = {"import_torch_accelerate_s", "import_accelengine_s", "import_accelengine_extra_s", "cli_to_first_step_s"}
    keys.add("bare_to_first_step_s")
    assert keys <= set(result)
    RESULTS["startup"] = result


def test_results_table_renders_from_the_scripts_json():
    run_all = load("run_all")
    assert set(CASES) | {"startup"} <= set(run_all.JOBS)  # every smoke-tested script is in the table
    if len(RESULTS) < len(CASES):
        pytest.skip("needs the script tests above to have run in this session")
    info = {k: "x" for k in ("cpu", "cores", "os", "python", "torch", "accelerate", "accelengine", "safetensors")}
    text = run_all.markdown({**RESULTS, "_load": "0", "_failed": {}}, info | {"datasets": "x", "commit": "x"}, True, 1)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Figure")]
    assert len(rows) >= len(RESULTS)  # a row (or more) per script
    assert all(line.count("|") == 7 for line in rows)  # six cells: nothing in a cell broke the table


def test_rounds_pooled_from_fresh_processes(capsys, monkeypatch):
    # two child processes of one round each: their rounds are pooled, pairs aligned, and the figures come from both
    args = ["--steps", "3", "--rounds", "2", "--warmup", "2", "--hidden", "8", "--processes", "2", "--no-plain-loader"]
    result = run_main("overhead", [*args, "--json"], capsys, monkeypatch)
    assert result["rounds"] == 2 and result["processes"] == 2
    low, high = result["engine_vs_raw_paired_ci95"]
    assert low <= result["engine_vs_raw_paired"] <= high
    assert "raw_plain_loader_us" not in result  # the children were given the flag


def test_a_failing_child_process_is_reported_with_its_command_and_error():
    # the first child fails (a bad argument): the error names its command and quotes its stderr; no second one runs
    with pytest.raises(RuntimeError, match=r"(?s)--hidden wide --rounds 1 --runs-only failed \(2\).*invalid int"):
        load("overhead").collect_in_processes(str(BENCHMARKS / "overhead.py"), 2, 2, ["--hidden", "wide"])


def test_each_child_process_gets_its_own_layout_seed(tmp_path):
    # a child that reports the seed it was given: process K gets `--layout-seed K`, and its rounds stay in order
    child = tmp_path / "child.py"
    child.write_text(
        "import json, sys\n"
        "seed = float(sys.argv[sys.argv.index('--layout-seed') + 1])\n"
        "rounds = int(sys.argv[sys.argv.index('--rounds') + 1])\n"
        "print(json.dumps({'seed': [seed] * rounds}))\n"
    )
    runs = load("overhead").collect_in_processes(str(child), 3, 6, [], layout_seeds=True)
    assert runs == {"seed": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]}


def test_interval_of_grouped_rounds_spans_the_groups():
    # rounds agree within each process but the processes disagree: resampling rounds alone would call the median
    # certain; the two-stage interval (processes, then rounds) must cover the spread between processes
    median_interval = load("overhead").median_interval
    values = [0.97] * 40 + [1.0] * 40 + [1.03] * 40
    assert median_interval(values) == (1.0, 1.0)
    low, high = median_interval(values, group_size=40)
    assert low <= 0.97 and high >= 1.03


def test_data_figure_pools_processes_with_their_own_layouts(capsys, monkeypatch):
    pytest.importorskip("datasets")
    args = ["--samples", "512", "--rounds", "2", "--processes", "2", "--json"]
    result = run_main("data_throughput", args, capsys, monkeypatch)
    assert result["processes"] == 2 and result["rounds"] == 2
    low, high = result["hf_vs_tensor_dataset_paired_ci95"]
    assert low <= result["hf_vs_tensor_dataset_paired"] <= high
