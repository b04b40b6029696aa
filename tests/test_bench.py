"""The benchmark driver: a 2-step smoke run on a tiny random-init model, failure rows, bad flags.

The smoke run starts one worker process per method (the real driver path), so it also checks
that each method's measured parameters + gradients + optimizer state after a step equal, to the
byte, those of the same step traced on fake tensors by ``estimate_memory``.
"""
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from owlore_kernels.__main__ import main
from owlore_kernels.bench import data as bench_data
from owlore_kernels.bench import methods as bench_methods
from owlore_kernels.bench import harness
from owlore_kernels.bench.worker import lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FIELDS = (
    "method", "status", "library", "trainable_params", "param_bytes", "grad_bytes", "optimizer_state_bytes",
    "projection_bytes", "accounted_peak_bytes", "peak_memory_bytes", "peak_memory_kind", "peak_rss_bytes",
    "rss_after_load_bytes", "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "final_train_loss",
    "eval_loss", "eval_accuracy", "eval_loss_before", "losses", "wall_s", "estimate", "estimate_max_rel_error",
    "traced_peak_bytes",
)


def _installed_methods():
    available = ["full"]
    if importlib.util.find_spec("peft"):
        available.append("lora")
    if importlib.util.find_spec("galore_torch"):
        available.append("galore")
    available += ["lisa", "owlore"]
    return available


def _bench(tmp_path, *args, env=None, timeout=900):
    cmd = [sys.executable, "-m", "owlore_kernels", "bench", "--model", "tiny", "--steps", "2", "--batch", "2",
           "--seq-len", "32", "--eval-seqs", "2", "--rank", "8", "--lora-rank", "4", "--gamma", "2",
           "--interval", "1", "--out", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _report(tmp_path):
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    with open(tmp_path / path) as f:
        return json.load(f)


def test_smoke_every_installed_method(tmp_path):
    methods = _installed_methods()
    # an earlier run of the same day, which the new run must not overwrite
    earlier = tmp_path / f"bench_tiny_{datetime.date.today().isoformat()}.md"
    earlier.write_text("earlier run\n")
    out = _bench(tmp_path, "--methods", ",".join(methods))
    assert out.returncode == 0, out.stderr[-3000:]
    report = _report(tmp_path)
    assert earlier.read_text() == "earlier run\n"
    assert report["files"]["md"] == str(earlier).replace(".md", "_2.md")
    assert set(report) >= {"meta", "config", "notes", "results", "files"}
    for key in ("date", "model_name", "model_source", "dataset", "machine", "versions", "wall_s"):
        assert key in report["meta"], key
    assert report["meta"]["model_name"] == "tiny"
    assert [r["method"] for r in report["results"]] == methods
    for r in report["results"]:
        assert r["status"] == "ok", r
        missing = [f for f in RESULT_FIELDS if f not in r]
        assert not missing, (r["method"], missing)
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        # the traced step's params + grads + state after a step: the measured bytes exactly
        assert r["estimate_max_rel_error"] == 0.0, (r["method"], r["accounted_peak_bytes"], r["estimate"])
    by = {r["method"]: r for r in report["results"]}
    assert by["owlore"]["optimizer_state_bytes"] < by["lisa"]["optimizer_state_bytes"] < by["full"]["optimizer_state_bytes"]
    assert by["lisa"]["trainable_params"] < by["full"]["trainable_params"]
    for kind in ("json", "md", "png"):
        assert os.path.isfile(report["files"][kind]), kind
    assert "method" in out.stdout and "owlore" in out.stdout  # the table on stdout


def test_random_init_config_with_every_memory_option(tmp_path):
    """The path of ``--model llama2-7b --device cuda --dtype bf16 --grad-checkpointing``: a config the
    workers build with random weights on the device (here a tiny config.json, on the CPU), with the
    chunked loss and in-backward steps; the traced peak sits beside the measured one."""
    config = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "tiny-llama.json"
    path.write_text(json.dumps(config))
    out = _bench(tmp_path / "out", "--model", str(path), "--methods", "owlore,full", "--dtype", "bf16", "--gamma", "1",
                 "--grad-checkpointing", "--chunked-loss", "--chunk-size", "16", "--in-backward")
    assert out.returncode == 0, out.stderr[-3000:]
    report = _report(tmp_path / "out")
    assert report["meta"]["model_name"] == "tiny-llama"
    assert report["meta"]["model_source"].startswith("RANDOM-INIT tiny-llama (2 blocks, hidden 32, vocab 64)")
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["grad_bytes"] == 0  # in-backward steps free every gradient before step() returns
        assert r["estimate_max_rel_error"] == 0.0, (r["method"], r["accounted_peak_bytes"], r["estimate"])
        assert r["traced_peak_bytes"] == r["estimate"]["peak"] > r["accounted_peak_bytes"]
    assert "traced peak MiB" in out.stdout


def test_builtin_7b_config_is_prepared_without_building_it(tmp_path):
    from owlore_kernels.bench import driver

    prepared = driver.prepare_model("llama2-7b", str(tmp_path), 0, print)
    assert prepared["random_init"] and prepared["model_dir"] is None and os.listdir(tmp_path) == []
    assert (prepared["config"]["hidden_size"], prepared["config"]["num_hidden_layers"]) == (4096, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without CUDA")
def test_7b_command_line_is_accepted_up_to_the_device(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda", "--dtype", "bf16", "--model", "llama2-7b", "--grad-checkpointing",
              "--batch", "16", "--seq-len", "512", "--methods", "owlore", "--rank", "256"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: 'cuda' requested" in err, err


def test_missing_library_is_reported_in_its_row(tmp_path):
    # a stand-in `peft` that fails to import, first on the workers' path
    fake = tmp_path / "fake"
    (fake / "peft").mkdir(parents=True)
    (fake / "peft" / "__init__.py").write_text("raise ImportError('peft deliberately hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    out = _bench(tmp_path / "out", "--methods", "lora,full", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    by = {r["method"]: r for r in _report(tmp_path / "out")["results"]}
    assert by["lora"]["status"] == "failed"
    assert "peft" in by["lora"]["error"] and by["lora"]["install"] == "pip install peft"
    assert by["full"]["status"] == "ok"
    assert "FAILED" in out.stdout and "pip install peft" in out.stdout


@pytest.mark.parametrize("args, flag, value", [
    (["--methods", "full,sgd"], "--methods", "sgd"),
    (["--model", "gpt-17"], "--model", "gpt-17"),
    (["--model", "tiny", "--gamma", "9"], "--gamma", "9"),
    (["--model", "tiny", "--gamma", "0"], "--gamma", "0"),
    (["--model", "tiny", "--rank", "0"], "--rank", "0"),
    (["--model", "tiny", "--rank", "65"], "--rank", "65"),
    (["--steps", "1"], "--steps", "1"),
    (["--dtype", "int4"], "--dtype", "int4"),
    (["--batch", "two"], "--batch", "two"),
    (["--model", "tiny", "--offload-checkpoints"], "--offload-checkpoints", "--grad-checkpointing"),
    (["--model", "tiny", "--rank", "8", "--device", "cpu", "--grad-checkpointing", "--offload-checkpoints"],
     "--offload-checkpoints", "--device cpu"),
])
def test_bad_flags_name_flag_and_value(args, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err, err


def test_bad_json_config_names_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,}')
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --model" in err and str(tmp_path / "config.json") in err and "line 1, column 20" in err


# ------------------------------------------------------------------ pieces
def test_dataset_splits_are_disjoint_and_labels_cover_answers_only():
    tok = bench_data.CharTokenizer()
    train, held = bench_data.build_splits(tok.encode, tok.pad_token_id, steps=4, batch=2, seq_len=64,
                                          eval_seqs=4, seed=0)
    assert train.input_ids.shape == (8, 64) and held.input_ids.shape == (4, 64)
    scored = train.labels != bench_data.IGNORE
    assert torch.equal(train.labels[scored], train.input_ids[scored])
    assert torch.equal(scored, train.example_ids >= 0)
    inv = {v: k for k, v in tok.vocab.items()}

    def questions(split):
        text = "".join(inv.get(int(i), "|") for i in split.input_ids.flatten())
        return {q.split("? Answer")[0] for q in text.split("What is ")[1:]}

    assert questions(train).isdisjoint(questions(held))


def test_answer_accuracy_counts_whole_answers():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    example_ids = torch.tensor([[-1, -1, 0, 0, 1]])  # example 0 = tokens 2,3; example 1 = token 4
    logits = torch.full((1, 5, 12), -1.0)
    for pos, tok in ((1, 7), (2, 8), (3, 0)):  # predicts 7 and 8 right, token 9 wrong
        logits[0, pos, tok] = 1.0
    assert bench_data.answer_accuracy(logits, ids, example_ids) == (1, 2)


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    f = [lr_factor(s, 20) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert f[-1] > 0.1 and abs(lr_factor(20, 20) - 0.1) < 1e-12


def test_state_bytes_counts_galore_projector_objects():
    class Projector:  # galore-torch keeps P inside an object in the state
        def __init__(self):
            self.ortho_matrix = torch.zeros(4, 2)

    p = torch.nn.Parameter(torch.zeros(4, 8))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"step": 3, "exp_avg": torch.zeros(2, 8), "exp_avg_sq": torch.zeros(2, 8), "projector": Projector()}
    assert bench_methods.state_bytes(opt) == (2 * 16 * 4, 8 * 4)


def test_state_bytes_counts_the_storage_behind_a_view_once():
    # galore-torch keeps U[:, :rank] of an fp32 SVD: a view that holds all of U
    class Projector:
        def __init__(self, u):
            self.ortho_matrix = u[:, :2]

    u = torch.zeros(4, 4)
    p, q = torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(4, 8))
    opt = torch.optim.SGD([p, q], lr=0.1)
    opt.state[p] = {"exp_avg": torch.zeros(2, 8), "projector": Projector(u)}
    opt.state[q] = {"exp_avg": torch.zeros(2, 8), "projector": Projector(u)}  # the same U: counted once
    assert bench_methods.state_bytes(opt) == (2 * 16 * 4, 16 * 4)


# ------------------------------------------------------------------ harness
def test_quantile_is_a_measured_sample_at_the_nearest_rank():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]  # sorted 1..5: rank round(q * 4)
    assert [harness.quantile(samples, q) for q in (0.0, 0.1, 0.5, 0.9, 1.0)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="q must be"):
        harness.quantile(samples, 1.5)


def test_time_interleaved_warms_up_then_rotates_the_order():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = harness.time_interleaved(candidates, repeats=3, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.samples_ms) == 3 and t.min >= 0 for t in timings.values())
    summary = timings["a"].summary()
    assert summary["min"] <= summary["p10"] <= summary["median"] <= summary["p90"] <= summary["max"]
    with pytest.raises(ValueError, match="repeats"):
        harness.time_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="flush_l2"):
        harness.time_interleaved({"a": lambda: None}, repeats=1, flush_l2=True)


def test_timing_statistics_are_pytest_benchmarks_and_follow_added_samples():
    timing = harness.Timing([4.0, 1.0, 3.0, 2.0])
    assert timing.stats.data == [0.004, 0.001, 0.003, 0.002]  # seconds, as pytest-benchmark stores them
    assert (timing.median, timing.min, timing.max) == (2.5, 1.0, 4.0)
    timing.samples_ms.append(100.0)  # read again: no stale cached median
    assert (timing.median, timing.max) == (3.0, 100.0)


def test_append_results_saves_pytest_benchmark_runs_and_never_rewrites_earlier_ones(tmp_path):
    stamp = harness.machine_stamp()
    assert {"date", "commit", "machine", "versions"} <= set(stamp)
    assert stamp["versions"]["torch"] == torch.__version__
    assert isinstance(stamp["machine"]["cpu"], str) and stamp["machine"]["cpu_count"] == os.cpu_count()
    paths = []
    for run in range(2):
        rows = [{"candidate": "x", "median": float(run)}]
        timing = harness.Timing([1.0 + run, 2.0 + run, 3.0 + run])
        paths.append(harness.append_results(
            str(tmp_path), "demo", rows=rows, stamp=stamp, command="demo --run",
            table=harness.markdown_table(["candidate", "median"], [["x", run]]),
            benchmarks=[harness.benchmark_entry("demo", "x", timing)])[0])
    assert len(set(paths)) == 2 and [os.path.basename(p)[:5] for p in paths] == ["0001_", "0002_"]
    runs = [json.load(open(p)) for p in paths]
    assert [r["rows"][0]["median"] for r in runs] == [0.0, 1.0]
    assert [r["benchmarks"][0]["stats"]["median"] for r in runs] == [0.002, 0.003]
    assert harness.same_machine(runs[0]["machine_info"], runs[1]["machine_info"])
    assert not harness.same_machine(runs[0]["machine_info"], {**runs[0]["machine_info"], "gpu": "another GPU"})
    rebooted = {**runs[0]["machine_info"], "memory_bytes": runs[0]["machine_info"]["memory_bytes"] - 300 * 2**10}
    assert harness.same_machine(runs[0]["machine_info"], rebooted)
    # pytest-benchmark's own reader finds both runs and the timing in them
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.storage.file import FileStorage
    from pytest_benchmark.utils import get_machine_id

    storage = FileStorage(str(tmp_path / "demo"), logger=Logger(Logger.QUIET), default_machine_id=get_machine_id())
    assert [b["median"] for b in storage.load_benchmarks()] == [0.002, 0.003]
    md = (tmp_path / "demo.md").read_text()
    assert md.count("## ") == 2 and md.count("| x | 0 |") == 1 and md.count("| x | 1 |") == 1
    stem = str(tmp_path / "fig")
    assert harness.unique_stem(stem, (".png", ".md")) == stem
    (tmp_path / "fig.md").write_text("")
    assert harness.unique_stem(stem, (".png", ".md")) == stem + "_2"


def test_frozen_galore_refresh_gives_an_orthonormal_basis_and_restores_the_svd():
    galore_projector = pytest.importorskip("galore_torch.galore_projector")
    original = galore_projector.GaLoreProjector.get_orthogonal_matrix
    proj = galore_projector.GaLoreProjector(rank=3)
    w = torch.randn(5, 8)
    with harness.frozen_galore_refresh():
        left = proj.get_orthogonal_matrix(w, 3, "left")
        right = proj.get_orthogonal_matrix(w, 3, "right")
        assert galore_projector.GaLoreProjector.get_orthogonal_matrix is not original
    assert galore_projector.GaLoreProjector.get_orthogonal_matrix is original
    assert left.shape == (5, 3) and right.shape == (3, 8)
    # Q of a QR in fp32: Q^T Q = I to a few fp32 ulps (k = 3, entries O(1))
    torch.testing.assert_close(left.t() @ left, torch.eye(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(right @ right.t(), torch.eye(3), rtol=0, atol=1e-5)


# scripts whose main() sets TRITON_INTERPRET before the kernels import: importing them must not import those
SETS_TRITON_MODE = ("gpu_check.py", "gpu_static_check.py")


@pytest.mark.parametrize("interpret", [None, "1"], ids=["no-TRITON_INTERPRET", "TRITON_INTERPRET=1"])
# benchmarks/ also holds pytest-benchmark's test module and its conftest.py: not scripts
@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                                          if f.endswith(".py") and not f.startswith("test_") and f != "conftest.py"))
def test_benchmark_script_import_does_no_work(script, interpret):
    """Importing a benchmark script only defines things: it reads no sys.argv (an unknown flag
    must not stop it), changes no environment variable (TRITON_INTERPRET decides how the Triton
    kernels import: run with it unset and set, so setting or removing it shows) and edits no
    sys.path; main() does the work. The scripts whose main() sets the Triton mode import no
    kernel, op or triton module either. Each runs in a fresh interpreter."""
    path = os.path.join(ROOT, "benchmarks", script)
    probe = (
        "import importlib.util, json, os, sys\n"
        "env, syspath = dict(os.environ), list(sys.path)\n"
        f"sys.argv = [{path!r}, '--definitely-not-a-flag']\n"
        f"spec = importlib.util.spec_from_file_location('bench_probe', {path!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('owlore_kernels.kernels', 'owlore_kernels.ops', "
        "'triton')))\n"
        "print(json.dumps({'env': changed, 'sys_path': sys.path != syspath,\n"
        "                  'main': callable(getattr(module, 'main', None)), 'heavy': heavy}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = seen.pop("heavy")
    assert seen == {"env": [], "sys_path": False, "main": True}, seen
    if script in SETS_TRITON_MODE:
        assert heavy == [], f"importing {script} imported {heavy}"
