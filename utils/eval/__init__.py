"""What evaluate.py scores with: its scorer (scoring.py: each task's problems, a Generator's answers, the
programs run, pass@k; also what finetune.py's in-training pass@1 scores with), HumanEval/MBPP problems and
the texts and n-grams decontamination checks (benchmarks.py, also used by data/preprocess.py), the programs built from answers (programs.py, also used by the RL stage's
rewards), HumanEval-X/MultiPL-E programs and toolchains (multilingual.py), the sandbox that runs
model-written code (sandbox.py), and generation through an OpenAI-compatible server (api_generation.py)."""
