"""The quality study (owlore_kernels/study.py): its statistics, its metrics, its splits and the whole
pipeline on a tiny random-init model (``python -m owlore_kernels study --quick``)."""
import json
import math
import re

import numpy as np
import pytest
import torch

from owlore_kernels import study
from owlore_kernels.__main__ import main
from owlore_kernels.bench import data as bench_data

transformers = pytest.importorskip("transformers")


def _t_density(x, df):
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", list(range(1, 31)) + [45])
def test_t_quantiles_against_the_t_density(df):
    # P(|T| < q) by the trapezoid rule on 200k intervals (error ~1e-10 for this smooth density). The table
    # has 3 decimals: rounding q by <= 5e-4 moves P by <= 2 pdf(q) 5e-4 <= 6e-5 (pdf(2.04) = 0.05 at df = 30).
    # Above 30 the table gives the normal 1.96: at df = 45, P(|T| < 1.96) = 0.9438, within 7e-3.
    q = study.t_quantile_975(df)
    xs = np.linspace(0.0, q, 200_001)
    coverage = 2 * np.trapezoid(_t_density(xs, df), xs)
    assert abs(coverage - 0.95) < (7e-3 if df > 30 else 1e-4), (df, q, coverage)


def test_mean_ci_by_hand():
    ci = study.mean_ci([1.0, 2.0, 3.0])  # mean 2, sample sd 1
    assert ci["mean"] == 2.0 and ci["sd"] == pytest.approx(1.0)
    assert ci["half"] == pytest.approx(4.303 / math.sqrt(3))
    assert (ci["lo"], ci["hi"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    one = study.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["half"] is None
    with pytest.raises(ValueError, match="df"):
        study.t_quantile_975(0)


def _tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(bench_data.CharTokenizer()), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def test_answer_loss_is_the_hf_loss():
    # The same cross-entropy over the same positions; only the head GEMM's row count differs, which
    # changes fp32 summation order: ~1e-7 relative on a loss of ~3.4.
    model = _tiny()
    char = bench_data.CharTokenizer()
    packed = bench_data.pack(char.encode, char.pad_token_id, 3, 48, seed=1, held_out=False)
    ours = study.answer_loss(model, packed.input_ids, packed.labels)
    theirs = model(input_ids=packed.input_ids, labels=packed.labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_exact_match_is_greedy_decoding():
    """An answer equal to the model's own greedy continuation scores 1, one changed token scores 0, and the
    loss is the mean -log p of the answer tokens, each from a full forward pass over the whole row."""
    model = _tiny()
    char = bench_data.CharTokenizer()
    prompts = [char.encode(p) for p in ("What is 3+4? Answer:", "What is 12*7? Answer:", "What is 99-5? Answer:")]
    rows = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(3):  # greedy decoding, one full forward per token
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        rows.append((prompt, ids[len(prompt):]))
    wrong_last = (rows[1][0], rows[1][1][:2] + [(rows[1][1][2] + 1) % len(char)])
    qset = study.question_rows(rows + [wrong_last], char.pad_token_id)
    result = study.evaluate(model, qset, batch=2, device=torch.device("cpu"))
    assert result["correct"] == [True, True, True, False]
    assert result["accuracy"] == 0.75
    nll = []
    for prompt, answer in rows + [wrong_last]:
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
        nll += [-float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer)]
    assert result["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_eval_questions_are_distinct_held_out_and_fixed():
    val, test = study.eval_questions(128, 512)
    assert len(val) == 128 and len(test) == 512
    prompts = [p for p, _ in val + test]
    assert len(set(prompts)) == len(prompts)  # distinct, so val and test are disjoint
    for prompt, answer in val + test:
        a, op, b = re.fullmatch(r"What is (\d+)([-+*])(\d+)\? Answer:", prompt).groups()
        assert bench_data.is_held_out(int(a), op, int(b))  # never a training question
        assert int(answer) == eval(f"{a}{op}{b}")
    assert study.eval_questions(128, 512) == (val, test)  # the same questions for every run


def test_quick_study_end_to_end(tmp_path, capsys):
    assert main(["study", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("study_tiny_*.json")
    report = json.loads(path.read_text())
    assert report["status"] == "complete" and report["deviations"] == [] and report["missing"] == []
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}  # the partial file is gone
    plan = study.QUICK_PLAN
    names = [a.name for a in study.ARMS]
    # every arm: the sweep over the whole grid on the sweep seed, then every seed at the chosen lr
    assert sorted((r["arm"], r["lr"]) for r in report["sweep"]) == sorted((n, lr) for n in names for lr in plan.lr_grid)
    for name in names:
        runs = [r for r in report["runs"] if r["arm"] == name]
        assert sorted(r["seed"] for r in runs) == list(plan.seeds)
        chosen = min((r for r in report["sweep"] if r["arm"] == name), key=lambda r: r["val_loss"])["lr"]
        assert {r["lr"] for r in runs} == {chosen} == {report["chosen_lr"][name]}
        assert all(len(r["losses"]) == plan.steps and 0 <= r["test_accuracy"] <= 1 for r in runs)
        summary = report["summary"]["arms"][name]
        assert summary["test_loss"]["n"] == 3 and summary["test_loss"]["lo"] <= summary["test_loss"]["hi"]
    # memory matching: LISA's gamma is the one whose measured state is closest to OwLore's, and the runs
    # hold exactly the state that was measured for the match
    match = report["memory_match"]
    gaps = {int(g): abs(b - match["owlore_state_bytes"]) for g, b in match["lisa_state_bytes"].items()}
    assert match["lisa_gamma"] == min(gaps, key=lambda g: (gaps[g], g))
    arms = report["summary"]["arms"]
    assert arms["lisa-matched"]["gamma"] == match["lisa_gamma"]
    assert arms["owlore"]["optimizer_state_bytes"] == match["owlore_state_bytes"]
    assert arms["lisa-matched"]["optimizer_state_bytes"] == match["lisa_state_bytes"][str(match["lisa_gamma"])]
    # paired differences: per seed, a - b
    for entry in report["summary"]["paired"]:
        a = {r["seed"]: r["test_loss"] for r in report["runs"] if r["arm"] == entry["a"]}
        b = {r["seed"]: r["test_loss"] for r in report["runs"] if r["arm"] == entry["b"]}
        assert entry["test_loss"]["values"] == pytest.approx([a[s] - b[s] for s in sorted(a)])
    assert "Paired differences" in capsys.readouterr().out

    # a study stopped midway: --render reports the runs that finished and names the missing ones
    report["runs"] = [r for r in report["runs"] if not (r["arm"] == "galore" and r["seed"] == 2)]
    stopped = tmp_path / "stopped" / "study_tiny.partial.json"
    stopped.parent.mkdir()
    stopped.write_text(json.dumps(report))
    assert main(["study", "--render", str(stopped), "--out", str(stopped.parent)]) == 0
    assert not stopped.exists()  # replaced by the dated report
    (md,) = stopped.parent.glob("study_tiny_*.md")
    assert "**Not run**" in md.read_text() and "galore seed 2" in md.read_text()
    (rendered,) = stopped.parent.glob("study_tiny_*.json")
    rendered = json.loads(rendered.read_text())
    assert rendered["status"] == "incomplete"
    assert rendered["summary"]["arms"]["galore"]["test_loss"]["n"] == 2


def test_bad_flags_are_argparse_errors(capsys):
    for flags, needle in ((["--arms", "owlore,nope"], "--arms: unknown arm 'nope'"),
                          (["--steps", "3"], "--steps: must be >= 10"),
                          (["--lr-grid", "abc"], "--lr-grid")):
        with pytest.raises(SystemExit) as exc:
            main(["study", "--quick", *flags])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
