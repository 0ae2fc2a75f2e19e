"""RL speed: finetune_rl.py against TRL's GRPOTrainer as its documentation shows it, and in its fastest CPU mode.

    .venv/bin/python bench/bench_rl.py [--steps 4] [--rounds 2]

Each trainer runs in its own process, alternating (ours, TRL documented, TRL fastest, ours
--cpu_speedups False, then again), so that drift in the machine's speed hits all alike. All train
SmolLM2-135M-Instruct (the embedded default) with a new LoRA adapter, r=8 on q_proj,v_proj, on the
same 32 MBPP train problems asked in the model's chat template, 4 problems x 4 answers of up to 96
tokens a step at temperature 0.8, learning rate 5e-4, no KL term (beta 0), with the same reward:
utils/train/rewards.py's SandboxReward (the sandbox's verdict, all answers of a step at once):
  - ours: `finetune_rl.py` with its defaults (bf16 on a CPU with native bf16, utils/train/grpo.py's
    sampling and log-probabilities, finetune.py's CPU speed-ups);
  - ours_plain: `finetune_rl.py --cpu_speedups False` (TRL's and PEFT's own code, our settings);
  - trl_documented: `GRPOTrainer(model=<path>, reward_funcs=..., args=GRPOConfig(...), peft_config=...)`
    as TRL's GRPO page shows it: the model loaded by TRL (the checkpoint's dtype, float32 here), TRL's
    defaults (bf16 autocast, activation checkpointing), conversational prompts;
  - trl_fastest: the same with the base loaded in bf16 and activation checkpointing off (faster here).
The first step of each run is left out (warm-up). Reported, medians over rounds: seconds a step,
steps/s, the share of a step spent sampling and scoring (the reward), the answers' mean length; and
the time generate.py's batched generation (utils/serve/generation.py: the model merged, the
generation precision) takes to answer the same 16 prompts alone, the floor a step cannot go under.
Prints a Markdown table for bench/RESULTS.md.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402
from machine import cpu_name  # noqa: E402

SETTINGS = dict(prompts_per_step=4, num_generations=4, max_completion_length=96, temperature=0.8, learning_rate=5e-4)
TRAINERS = {
    "ours": "finetune_rl.py (its defaults)",
    "ours_plain": "finetune_rl.py --cpu_speedups False",
    "trl_documented": "TRL GRPOTrainer as documented (model by path, its defaults: bf16 autocast, checkpointing)",
    "trl_fastest": "TRL GRPOTrainer, bf16 base, no activation checkpointing",
}
PROBLEMS = 32
MBPP = str(ROOT.parent / "shared" / "data" / "mbpp.jsonl")  # the project's data folder (README, Data)


class StepClock:
    """A TrainerCallback: each step's wall time, and the time inside sampling and the reward."""

    def __init__(self):
        self.steps, self.sampling, self.reward = [], [], []
        self._start = self._sampling = self._reward = 0.0

    def wrap(self, trainer, reward_function):
        def timed(function, field):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - start)
            return wrapper

        trainer._generate_single_turn = timed(trainer._generate_single_turn, "_sampling")
        trainer.reward_funcs[0] = timed(reward_function, "_reward")

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._start, clock._sampling, clock._reward = time.perf_counter(), 0.0, 0.0

            def on_step_end(self, args, state, control, **kwargs):
                clock.steps.append(time.perf_counter() - clock._start)
                clock.sampling.append(clock._sampling)
                clock.reward.append(clock._reward)

        return Callback()


def write_problems(path: Path) -> list[dict]:
    from utils.train import rewards

    problems = rewards.load_problems("mbpp-train", mbpp_path=MBPP)[:PROBLEMS]
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return problems


def run_ours(*, problems_path: str, output_dir: str, steps: int, cpu_speedups: bool, clock: StepClock):
    import finetune_rl
    from utils.train import grpo

    original_init = grpo.SandboxGRPOTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        clock.wrap(self, self.reward_funcs[0])
        self.add_callback(clock.callback())

    grpo.SandboxGRPOTrainer.__init__ = init
    trainer = finetune_rl.train(data_path=problems_path, output_dir=output_dir, max_steps=steps, prompt_template="chat",
                                mbpp_path=MBPP, save_steps=10_000, cpu_speedups=cpu_speedups, **SETTINGS)
    return [e.get("completions/mean_length") for e in trainer.state.log_history if "completions/mean_length" in e]


def run_trl(*, problems_path: str, output_dir: str, steps: int, fastest: bool, clock: StepClock):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from utils.model_loading import resolve_model_reference
    from utils.train import rewards

    problems = [json.loads(line) for line in Path(problems_path).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}], "task_id": p["task_id"]}
                                 for p in problems])
    reward = rewards.SandboxReward(problems, response_of=lambda text: text)
    extra = dict(gradient_checkpointing=False, model_init_kwargs={"dtype": torch.bfloat16}) if fastest else {}
    args = GRPOConfig(output_dir=output_dir, use_cpu=True, max_steps=steps, logging_steps=1, report_to="none",
                      save_strategy="no", per_device_train_batch_size=SETTINGS["prompts_per_step"] * SETTINGS["num_generations"],
                      num_generations=SETTINGS["num_generations"], max_completion_length=SETTINGS["max_completion_length"],
                      temperature=SETTINGS["temperature"], learning_rate=SETTINGS["learning_rate"], beta=0.0, seed=42,
                      **extra)
    trainer = GRPOTrainer(model=resolve_model_reference("smollm2-135m"), reward_funcs=reward, args=args,
                          train_dataset=dataset,
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    clock.wrap(trainer, reward)
    trainer.add_callback(clock.callback())
    trainer.train()
    return [e.get("completions/mean_length") for e in trainer.state.log_history if "completions/mean_length" in e]


def generate_alone(problems_path: str) -> dict:
    """generate.py's batched generation (Generator.answer_batch) of the 16 answers of one step."""
    from utils.serve.generation import Generator

    problems = [json.loads(line) for line in Path(problems_path).read_text().splitlines()][:SETTINGS["prompts_per_step"]]
    generator = Generator(prompt_template="chat")
    records = [(p["prompt"], None) for p in problems for _ in range(SETTINGS["num_generations"])]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        answers = generator.answer_batch(records, temperature=SETTINGS["temperature"], top_p=1.0,
                                         max_new_tokens=SETTINGS["max_completion_length"])
        times.append(time.perf_counter() - start)
    lengths = [len(generator.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return {"seconds": min(times), "mean_length": statistics.mean(lengths)}


def child(trainer: str, problems_path: str, output_dir: str, steps: int):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if trainer == "generate_alone":
        print("RESULT " + json.dumps(generate_alone(problems_path)))
        return
    clock = StepClock()
    if trainer.startswith("ours"):
        lengths = run_ours(problems_path=problems_path, output_dir=output_dir, steps=steps,
                           cpu_speedups=trainer == "ours", clock=clock)
    else:
        lengths = run_trl(problems_path=problems_path, output_dir=output_dir, steps=steps,
                          fastest=trainer == "trl_fastest", clock=clock)
    print("RESULT " + json.dumps({"steps": clock.steps[1:], "sampling": clock.sampling[1:], "reward": clock.reward[1:],
                                  "mean_length": lengths[1:]}))


def run_child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "child", *args], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.exit(f"{args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(steps: int = 4, rounds: int = 2, trainers: str = "ours,trl_documented,trl_fastest,ours_plain",
         work_dir: str = "/tmp/codeup-bench-rl"):
    """steps: optimizer steps a run (the first is left out); rounds: runs of each trainer, alternating."""
    import tempfile

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    problems_path = Path(work_dir) / "problems.jsonl"
    write_problems(problems_path)
    names = trainers.split(",") if isinstance(trainers, str) else list(trainers)
    results = {name: [] for name in names}
    for round_number in range(rounds):
        for name in names:
            with tempfile.TemporaryDirectory(dir=work_dir) as output_dir:
                result = run_child([name, str(problems_path), output_dir, str(steps)])
            results[name].append(result)
            print(f"round {round_number + 1} {name}: {statistics.median(result['steps']):.1f} s a step", file=sys.stderr)
    alone = run_child(["generate_alone", str(problems_path), work_dir, "0"])

    def pooled(name, field):
        return [value for result in results[name] for value in result[field] if value is not None]

    rows = {}
    for name in names:
        steps_s = pooled(name, "steps")
        step = statistics.median(steps_s)
        rows[name] = dict(step=step, sampling=statistics.median(pooled(name, "sampling")),
                          reward=statistics.median(pooled(name, "reward")),
                          length=statistics.mean(pooled(name, "mean_length")), count=len(steps_s))
    baseline = rows.get("trl_documented", next(iter(rows.values())))["step"]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {rounds} rounds x {steps - 1} measured steps; "
          f"{SETTINGS['prompts_per_step']} problems x {SETTINGS['num_generations']} answers of up to "
          f"{SETTINGS['max_completion_length']} tokens a step, SmolLM2-135M-Instruct, LoRA r8 q,v\n")
    print("| trainer | s/step (median) | steps/s | vs TRL documented | sampling share | reward share | mean answer (tokens) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {TRAINERS[name]} | {row['step']:.1f} | {1 / row['step']:.3f} | {baseline / row['step']:.2f}x | "
              f"{row['sampling'] / row['step']:.0%} | {row['reward'] / row['step']:.1%} | {row['length']:.0f} |")
    print(f"\ngenerate.py's batched generation of one step's 16 answers alone: {alone['seconds']:.1f} s "
          f"(mean answer {alone['mean_length']:.0f} tokens)", end="")
    if "ours" in rows:
        print(f"; finetune_rl.py's step costs {rows['ours']['step'] / alone['seconds']:.2f}x that.")
    else:
        print(".")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        fire.Fire(main)
