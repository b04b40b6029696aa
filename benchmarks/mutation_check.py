"""Mutation check: does the fast test suite catch plausible bugs?

One question: for each bug in MUTATIONS -- a wrong update rule, a wrong basis, a sampler that
frees the wrong state, ... -- does a fast test fail? Each mutation is applied to its own copy
of the repository (the working tree without .git, copied to a temporary folder, one exact
text replacement in one file), and the mutation's test files run there with
``python -m pytest -x`` and PYTHONPATH at the copy. A mutation is

* caught: pytest reports a failed test (the first one is recorded);
* missed: every test passed -- the suite has a hole, and this script exits 1;
* an error: its old text is not in the file (it no longer applies: update it), or pytest
  could not run the tests (a collection error, a timeout) -- also exit 1.

Before the mutations, the unmutated copy runs the same test files once: they must pass, or
every "caught" would be meaningless. The C++ extension (``owlore_kernels/_C*.so``) is copied
as built: mutations change Python files only, and tests that force ``backend="torch"`` see the
reference ops' mutations (the default CPU backend is the C++ one).

    python benchmarks/mutation_check.py [--only NAME ...] [--timeout 900] [--no-save]

Appends a table (mutation, file, caught?, first failing test, seconds) with the machine and
date to benchmarks/results/mutation_check.md (and the rows to mutation_check.jsonl).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# The fast test files of each area, in the order they run (-x stops at the first failure).
OPTIM_TESTS = ("tests/test_optim.py",)
SAMPLER_TESTS = ("tests/test_sampler.py",)
# Slow tests (tens of seconds each; galore-torch at LM scale, a training curve, PEFT models) left
# out to keep a run near half an hour on 2 cores; the rest of each file runs.
DESELECT = (
    "not loss_curve and not randomized_captures and not lm_scale and not galore_torch_bound and not peft "
    "and not every_block_once")


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    # ------------------------------------------------------------ the optimizer's update rule
    Mutation("bf16/fp16 GaLore weights never updated (the rounded copy back is dropped)",
             "owlore_kernels/ops/back_project_update.py",
             "        param[rows].copy_(w)  # fp32 -> bf16/fp16 copy rounds to nearest even",
             "        pass", OPTIM_TESTS),
    Mutation("no weight decay on GaLore weights",
             "owlore_kernels/update_rule.py",
             'decay = 1.0 - lr * wd if wd > 0.0 else 1.0',
             'decay = 1.0', OPTIM_TESTS),
    Mutation("weight decay before the GaLore update instead of after (variant galore)",
             "owlore_kernels/update_rule.py",
             'alpha=-lr * math.sqrt(bias2) / bias1 * group["scale"] * decay)',
             'alpha=-lr * math.sqrt(bias2) / bias1 * group["scale"])', OPTIM_TESTS),
    Mutation("weight decay after the GaLore update instead of before (variant torch)",
             "owlore_kernels/update_rule.py",
             'beta=1.0 - lr * wd, alpha=-lr * group["scale"])',
             'beta=1.0 - lr * wd, alpha=-lr * group["scale"] * (1.0 - lr * wd))', OPTIM_TESTS),
    Mutation("bias correction dropped",
             "owlore_kernels/update_rule.py",
             "return 1.0 - beta1**step, 1.0 - beta2**step",
             "return 1.0, 1.0", OPTIM_TESTS),
    Mutation("eps inside the sqrt (reference op)",
             "owlore_kernels/ops/project_adam.py",
             "denom = v.div(bias2).sqrt_().add_(eps)",
             "denom = v.div(bias2).add_(eps).sqrt_()", OPTIM_TESTS),
    Mutation("beta2 in place of beta1 in the first moment (reference op)",
             "owlore_kernels/ops/project_adam.py",
             "m.mul_(beta1).add_(low, alpha=1.0 - beta1)",
             "m.mul_(beta1).add_(low, alpha=1.0 - beta2)", OPTIM_TESTS),
    Mutation("GaLore scale ignored",
             "owlore_kernels/update_rule.py",
             'alpha=-lr * math.sqrt(bias2) / bias1 * group["scale"] * decay)',
             'alpha=-lr * math.sqrt(bias2) / bias1 * decay)', OPTIM_TESTS),
    Mutation("plain AdamW: decay before the update (variant galore, reference op)",
             "owlore_kernels/ops/adamw.py",
             "        w.addcdiv_(m, v.sqrt().add_(eps), value=c[0])\n        if c[1] != 0.0:\n"
             "            w.add_(w, alpha=c[1])",
             "        if c[1] != 0.0:\n            w.add_(w, alpha=c[1])\n"
             "        w.addcdiv_(m, v.sqrt().add_(eps), value=c[0])", OPTIM_TESTS),
    # ------------------------------------------------------------------ the subspace refresh
    Mutation("refresh off by one (every update_proj_gap + 1 updates)",
             "owlore_kernels/update_rule.py",
             'return updates_done(state) % group["update_proj_gap"] == 0',
             'return updates_done(state) % (group["update_proj_gap"] + 1) == 0', OPTIM_TESTS),
    Mutation("std: sides swapped",
             "owlore_kernels/projector.py",
             'return "right" if m >= n else "left"',
             'return "left" if m >= n else "right"', OPTIM_TESTS),
    Mutation("bottom singular vectors instead of top",
             "owlore_kernels/projector.py",
             "u, vh = u[:, :rank], vh[:rank]",
             "u, vh = u[:, -rank:], vh[-rank:]", OPTIM_TESTS),
    Mutation("rank off by one",
             "owlore_kernels/optim.py",
             'return min(group["rank"], *p.shape), projection_side',
             'return min(group["rank"] - 1, *p.shape), projection_side', OPTIM_TESTS),
    Mutation("optimizer state release skipped",
             "owlore_kernels/optim.py",
             "            self.state.pop(p, None)\n\n    def state_bytes",
             "            self.state.get(p, None)\n\n    def state_bytes", OPTIM_TESTS),
    # --------------------------------------------------------------------------- the sampler
    Mutation("sampler frees the state of a block that is drawn again",
             "owlore_kernels/sampler.py",
             "            if i in active_set:\n                for p in params:",
             "            if i in active_set:\n                self._freeze(params)\n                for p in params:",
             SAMPLER_TESTS),
    Mutation("sampler load_state_dict keeps the constructor's probabilities",
             "owlore_kernels/sampler.py",
             "        self.probabilities = probs\n",
             "        self.probabilities = self.probabilities\n", SAMPLER_TESTS),
    Mutation("sampler load_state_dict keeps the constructor's generator",
             "owlore_kernels/sampler.py",
             "        self._rng = rng\n",
             "        self._rng = self._rng\n", SAMPLER_TESTS),
    Mutation("sampler interval off by one",
             "owlore_kernels/sampler.py",
             "if self.num_steps % self.interval == 0:",
             "if (self.num_steps + 1) % self.interval == 0:", SAMPLER_TESTS),
    Mutation("sampler draws ignore the probabilities",
             "owlore_kernels/sampler.py",
             "self._rng.choice(self.num_blocks, self.gamma, replace=False, p=self.probabilities)",
             "self._rng.choice(self.num_blocks, self.gamma, replace=False)", SAMPLER_TESTS),
    Mutation("sampler draws without renormalising (with replacement, repeated sets drawn again)",
             "owlore_kernels/sampler.py",
             "        drawn = self._rng.choice(self.num_blocks, self.gamma, replace=False, p=self.probabilities)\n",
             "        drawn = self._rng.choice(self.num_blocks, self.gamma, replace=True, p=self.probabilities)\n"
             "        while len(set(drawn.tolist())) < self.gamma:\n"
             "            drawn = self._rng.choice(self.num_blocks, self.gamma, replace=True, p=self.probabilities)\n",
             SAMPLER_TESTS),
    Mutation("sampler frees nothing when it freezes a block",
             "owlore_kernels/sampler.py",
             "        if callable(release):\n            release(params)",
             "        if callable(release):\n            pass", SAMPLER_TESTS),
)


class Outcome(NamedTuple):
    status: str  # "caught" | "missed" | "error"
    detail: str  # the first failing test, or what went wrong
    seconds: float


def copy_repository(destination: str) -> None:
    """The working tree (built extension included) without git's data, caches and virtual envs."""
    shutil.copytree(ROOT, destination, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "build",
                                                  "*.egg-info", ".benchmarks"))


def apply(mutation: Mutation, root: str) -> Optional[str]:
    """Replace the mutation's old text in its file under ``root``; the reason it cannot, or None."""
    path = os.path.join(root, mutation.path)
    if not os.path.exists(path):
        return f"{mutation.path} does not exist"
    with open(path) as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        return f"the old text occurs {count} times in {mutation.path} (must be once): update the mutation"
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))
    return None


def run_tests(root: str, tests: tuple[str, ...], timeout: float) -> Outcome:
    """pytest -x on ``tests`` in ``root``: caught (a test failed), missed (all passed) or error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = root
    command = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-rf", "-p", "no:cacheprovider",
               "-k", DESELECT]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome("error", f"timed out after {timeout:.0f} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    failed = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    if proc.returncode == 1 and failed:
        return Outcome("caught", failed.group(1), seconds)
    if proc.returncode == 0:
        return Outcome("missed", "every test passed", seconds)
    tail = " / ".join(line for line in output.strip().splitlines()[-3:])
    return Outcome("error", f"pytest exit code {proc.returncode}: {tail[-300:]}", seconds)


def check(mutation: Optional[Mutation], tests: tuple[str, ...], timeout: float) -> Outcome:
    """Copy the repository, apply ``mutation`` (None: unmutated) and run ``tests`` there."""
    with tempfile.TemporaryDirectory(prefix="owlore_mutant_") as tmp:
        root = os.path.join(tmp, "repo")
        copy_repository(root)
        if mutation is not None:
            problem = apply(mutation, root)
            if problem is not None:
                return Outcome("error", problem, 0.0)
        return run_tests(root, tests, timeout)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="run the mutations whose name contains TEXT")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(t in m.name for t in args.only)]
    if not mutations:
        parser.error(f"--only {args.only}: no mutation's name contains any of them")

    from owlore_kernels.bench.harness import append_results, machine_stamp, markdown_table

    stamp = machine_stamp()
    rows = []
    every_file = tuple(sorted({path for m in mutations for path in m.tests}))
    baseline = check(None, every_file, args.timeout)
    print(f"unmutated, {' '.join(every_file)}: {baseline.detail} ({baseline.seconds:.0f} s)", flush=True)
    if baseline.status != "missed":  # "missed" = every test passed, as it must without a mutation
        print(f"the unmutated tests do not pass ({baseline.status}: {baseline.detail}): fix that first",
              file=sys.stderr)
        return 1
    for mutation in mutations:
        outcome = check(mutation, mutation.tests, args.timeout)
        print(f"{outcome.status:6s} {mutation.name}: {outcome.detail} ({outcome.seconds:.0f} s)", flush=True)
        rows.append(dict(mutation=mutation.name, file=mutation.path, status=outcome.status, detail=outcome.detail,
                         seconds=round(outcome.seconds, 1), tests=list(mutation.tests)))
    table = markdown_table(["mutation", "file", "result", "first failing test (or why)", "s"],
                           [[r["mutation"], r["file"], r["status"], r["detail"], f"{r['seconds']:.0f}"]
                            for r in rows])
    print(table)
    if not args.no_save:
        command = "python benchmarks/mutation_check.py" + (" --only " + " ".join(args.only) if args.only else "")
        notes = ("Each mutation is one text replacement in a copy of the repository; its test files run there "
                 f"with pytest -x -k {DESELECT!r}. caught: a test failed (the first is shown); missed: all passed.")
        paths = append_results(RESULTS, "mutation_check", rows=rows, stamp=stamp, command=command, notes=notes,
                               table=table)
        print("appended to", ", ".join(paths))
    return 0 if all(r["status"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
