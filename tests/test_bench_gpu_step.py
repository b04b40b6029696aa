"""benchmarks/bench_gpu_step.py on CPU at a tiny size: every scenario and optimizer runs, the
GaLore groups hold the weights the scenario says, and the run is saved (markdown + JSON)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_step", os.path.join(ROOT, "benchmarks", "bench_gpu_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu_times_every_optimizer_in_both_scenarios(tmp_path, capsys):
    pytest.importorskip("galore_torch")
    bench = _load_script()
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "0", "--out", str(tmp_path)]) == 0
    (json_path,) = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "gpu_step_tiny") for f in files]
    with open(json_path) as f:
        run = json.load(f)
    rows = {(r["scenario"], r["optimizer"]): r for r in run["rows"]}
    assert set(rows) == {(s, o) for s in bench.SCENARIOS for o in bench.OPTIMIZERS}
    blocks = bench.TINY["num_hidden_layers"]
    for optimizer in bench.OPTIMIZERS:
        # all-layer: every block's 7 linears; owlore: gamma = 2 (the --tiny default) blocks' linears
        assert rows[("all-layer", optimizer)]["galore_weights"] == bench.LINEARS_PER_BLOCK * blocks
        assert rows[("owlore", optimizer)]["galore_weights"] == bench.LINEARS_PER_BLOCK * 2
        assert len(rows[("owlore", optimizer)]["active_blocks"]) == 2
        assert rows[("owlore", optimizer)]["trained_params"] < rows[("all-layer", optimizer)]["trained_params"]
        assert rows[("owlore", optimizer)]["peak_bytes"] is None  # no CUDA allocator on CPU
    assert all(len(b["stats"]["data"]) == 2 for b in run["benchmarks"]) and len(run["benchmarks"]) == 6
    assert (tmp_path / "gpu_step_tiny.md").read_text().count("| owlore | owlore |") == 1


def test_bad_flags_name_the_flag():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--optimizers", "owlore,sgd"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
