"""RL stage: reinforcement learning from unit tests (GRPO), every answer run in the sandbox.

    python finetune_rl.py --lora_weights runs/smollm2/lora --data_path mbpp-train --output_dir runs/smollm2/rl
    python finetune_rl.py --base_model Qwen/Qwen2.5-Coder-7B-Instruct --load_in_4bit --prompt_template chat \\
        --data_path my_problems.jsonl --lora_r 16 --prompts_per_step 8 --num_generations 8

For each step, `--prompts_per_step` problems are asked `--num_generations` times each; every answer
runs against its problem's tests in evaluate.py's sandbox (utils/train/rewards.py: the same program
assembly and verdict as evaluate.py), and TRL's GRPOTrainer moves the LoRA adapter toward the
answers that beat their group's mean. The steps, top to bottom: check every flag and the problems
(decontaminated against the benchmarks evaluate.py scores, each `solution` checked), before any
model loads; load the base and the adapter (or a new one); train (utils/train/grpo.py: TRL's
trainer, its sampling and log-probabilities faster on a CPU, inside finetune.py's speed-ups; one line
says which are on); save what finetune.py saves (adapter, prompt_template.json, trainer_state.json)
and reward.png.
"""

import functools
import os
import re
import warnings
from pathlib import Path

from utils.logs import logger  # first: it silences known-harmless notices the libraries print on import

import transformers

from utils.chat_data import CHAT, ChatPrompter, resolve_prompt_format
from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.eval.sandbox import require_a_sandbox
from utils.files import replacing
from utils.model_loading import DEFAULT_BASE_MODEL, load_model, load_tokenizer, resolve_model_reference
from utils.precision import resolve_precision, torch_dtype
from utils.prompter import Prompter, read_template_record, save_template_record
from utils.train import rewards
from utils.train.checkpoints import MarkCompleteCheckpoints, RecordPromptTemplate, find_checkpoint
from utils.train.speedups import training_speedups

DEFAULT_MBPP = "data/mbpp.jsonl"


def train(
    *,
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    prompt_template: str | None = None,
    data_path: str = "mbpp-train",
    mbpp_path: str = DEFAULT_MBPP,
    output_dir: str = "./lora-rl",
    max_steps: int = 40,
    num_epochs: float = 1.0,
    prompts_per_step: int = 4,
    num_generations: int = 4,
    max_completion_length: int = 128,
    temperature: float = 0.8,
    learning_rate: float = 5e-4,
    beta: float = 0.0,
    reward: str = "pass",
    timeout: float = 5.0,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_target_modules=("q_proj", "v_proj"),
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    precision: str = "auto",
    save_steps: int = 20,
    resume_from_checkpoint=None,
    decontaminate_with: str = "",
    allow_unsandboxed: bool = False,
    seed: int = 42,
    report_to: str = "none",
    use_vllm: bool = False,
    cpu_speedups: bool = True,
):
    """GRPO from unit tests: sample answers, run them against the tests in the sandbox, reinforce those that pass.

    Args:
        base_model: hub id, local HF folder, .gguf file, or smollm2-135m (the embedded default).
        lora_weights: a finetune.py adapter to keep training (the usual start); none: a new adapter on the base.
        prompt_template: how problems are asked; default: the adapter's recorded training prompt, else alpaca;
            chat: the base's own chat template; or a template in templates/ or a JSON file.
        data_path: problems, JSONL or JSON: {"task_id", "prompt", "tests", "language" (default python),
            "solution" (optional, checked first)}; or mbpp-train: MBPP's train and validation splits (task ids
            511-974 of --mbpp_path), never its test split.
        mbpp_path: MBPP's jsonl (mbpp-train reads it; its test split is always kept out of training).
        output_dir: where the adapter, prompt_template.json, trainer_state.json, reward.png and checkpoints go.
        max_steps: optimizer steps (-1: --num_epochs over the problems).
        num_epochs: passes over the problems when --max_steps is -1.
        prompts_per_step: distinct problems a step.
        num_generations: answers sampled per problem (the group GRPO compares; at least 2).
        max_completion_length: the longest answer in tokens.
        temperature: sampling temperature of the answers.
        learning_rate: the LoRA learning rate (5e-4: measured to move a 135M model's reward in tens of steps).
        beta: weight of the KL penalty toward the starting model (0: none, and no reference model in memory).
        reward: pass (1 when every test passes, else 0) or fraction (the share of a Python problem's asserts
            that pass, those its prompt quotes left out: a constant answer passes a shown assert).
        timeout: seconds each answer's program may run (compiling has its own, longer limit).
        lora_r: LoRA rank of a new adapter.
        lora_alpha: LoRA alpha of a new adapter.
        lora_target_modules: the layers a new adapter adapts ('[q_proj,v_proj]' or q_proj,v_proj).
        load_in_8bit: load the base in 8-bit (bitsandbytes).
        load_in_4bit: load the base in 4-bit NF4 (bitsandbytes; QLoRA).
        precision: auto, bf16, fp16 or fp32 (auto: bf16 where the hardware has it; utils/precision.py).
        save_steps: write a checkpoint every this many steps (one counts once its completion marker is written).
        resume_from_checkpoint: a checkpoint folder, or True for the latest whole one in --output_dir.
        decontaminate_with: more benchmarks to keep out of training (files or folders, comma-separated), beside
            HumanEval and MBPP's test split, which are always checked (13-gram overlap, as data/preprocess.py).
        allow_unsandboxed: run model-written code with resource limits only where no sandbox is available.
        seed: seeds sampling, LoRA's initialization and the order of problems.
        report_to: none, tensorboard or wandb.
        use_vllm: generate with vLLM (TRL's option; a GPU and the vllm package needed).
        cpu_speedups: on a CPU, sample and compute the policy's log-probabilities faster (utils/train/grpo.py) and
            train with finetune.py's speed-ups (utils/train/speedups/); False: TRL's and PEFT's own code throughout.
    """
    cuda = use_this_process_gpu()
    check_flags(num_generations=num_generations, prompts_per_step=prompts_per_step, reward=reward,
                report_to=report_to, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    precision = resolve_precision(precision, stage="training", device="cuda" if cuda else "cpu")
    checkpoint = find_checkpoint(resume_from_checkpoint, output_dir=output_dir)
    check_adapter(lora_weights, base_model=base_model)
    problems = training_problems(data_path=data_path, mbpp_path=mbpp_path, decontaminate_with=decontaminate_with,
                                 timeout=timeout, allow_unsandboxed=allow_unsandboxed)

    transformers.set_seed(seed)
    tokenizer = load_tokenizer(base_model, padding_side="left")
    prompt_format = resolve_prompt_format(prompt_template, lora_weights or None)
    prompter = ChatPrompter(tokenizer) if prompt_format == CHAT else Prompter(prompt_format)
    dataset = prompt_dataset(problems, prompter=prompter)
    model = policy_model(base_model=base_model, lora_weights=lora_weights, load_in_8bit=load_in_8bit,
                         load_in_4bit=load_in_4bit, dtype=torch_dtype(precision))
    reward_function = rewards.SandboxReward(problems, response_of=prompter.response_from_continuation, reward=reward,
                                            timeout=timeout)
    trainer = build_trainer(
        model=model, tokenizer=tokenizer, dataset=dataset, reward_function=reward_function,
        new_adapter=None if lora_weights else dict(r=lora_r, lora_alpha=lora_alpha, target_modules=parse_list(lora_target_modules)),
        config=dict(output_dir=output_dir, max_steps=max_steps, num_train_epochs=num_epochs,
                    per_device_train_batch_size=prompts_per_step * num_generations, num_generations=num_generations,
                    max_completion_length=max_completion_length, temperature=temperature, learning_rate=learning_rate,
                    beta=beta, save_steps=save_steps, seed=seed, report_to=report_to, use_vllm=use_vllm,
                    use_cpu=not cuda, bf16=precision == "bf16", fp16=precision == "fp16"),
    )
    template_record = template_record_of(prompt_template=prompt_template, lora_weights=lora_weights,
                                         prompt_format=prompt_format)
    trainer.callback_handler.callbacks.insert(0, RecordPromptTemplate(template_record))
    with training_speedups(trainer, enabled=cpu_speedups, cutoff_len=max_completion_length):
        trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        save_template_record(output_dir, **template_record)
        plot_rewards(log_history=trainer.state.log_history, path=Path(output_dir) / "reward.png",
                     reward_name=reward_function.__name__)
        print(f"Saved the LoRA adapter, prompt_template.json, trainer_state.json and reward.png in {output_dir}")
    return trainer


def use_this_process_gpu() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def check_flags(*, num_generations: int, prompts_per_step: int, reward: str, report_to: str, load_in_8bit: bool,
                load_in_4bit: bool) -> None:
    if num_generations < 2:
        raise CodeUpError("--num_generations must be at least 2: GRPO compares each answer with its group's others")
    if prompts_per_step < 1:
        raise CodeUpError("--prompts_per_step must be at least 1")
    if reward not in rewards.REWARDS:
        raise CodeUpError(f"--reward takes {' or '.join(rewards.REWARDS)}, not {reward!r}")
    if report_to not in ("none", "tensorboard", "wandb"):
        raise CodeUpError(f"--report_to must be none, tensorboard or wandb, not {report_to!r}")
    if load_in_8bit and load_in_4bit:
        raise CodeUpError("--load_in_8bit and --load_in_4bit: choose one")


def check_adapter(lora_weights: str, *, base_model: str) -> None:
    """An adapter folder whose every LoRA matrix fits a linear layer of the base: read from the
    adapter's safetensors header and the base's config on the meta device (no weight is loaded)."""
    if not lora_weights:
        return
    folder = Path(lora_weights).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise CodeUpError(f"--lora_weights {lora_weights}: no adapter_config.json (train one with finetune.py)")
    if not (folder / "adapter_model.safetensors").is_file():
        return  # an old .bin adapter: PEFT itself says whether it fits, once the base has loaded
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_reference(base_model)))
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if not match:
                continue
            name, matrix = match.groups()
            shape = tensors.get_slice(key).get_shape()
            layer = linears.get(name)
            fits = layer is not None and (shape[1] == layer.in_features if matrix == "A" else shape[0] == layer.out_features)
            if not fits:
                raise CodeUpError(f"--lora_weights {lora_weights} is not an adapter of {base_model}: its {key} "
                                  f"{list(shape)} fits no linear layer of the base")


def training_problems(*, data_path: str, mbpp_path: str, decontaminate_with: str, timeout: float,
                      allow_unsandboxed: bool) -> list[dict]:
    """The problems to train on: read, their toolchains present, decontaminated, their solutions passing."""
    problems = rewards.load_problems(data_path, mbpp_path=mbpp_path)
    rewards.check_toolchains(problems)
    require_a_sandbox(allow_unsandboxed)
    sources = rewards.benchmark_sources(mbpp_path=mbpp_path, decontaminate_with=parse_list(decontaminate_with))
    problems, dropped = rewards.decontaminate(problems, sources=sources)
    if not problems:
        raise CodeUpError(f"--data_path {data_path}: every problem overlaps a benchmark evaluate.py scores "
                          f"({'; '.join(f'{len(ids)} {label}' for label, ids in dropped.items())})")
    for label, task_ids in dropped.items():
        logger.warning(f"dropped {len(task_ids)} problem(s) that overlap {label}: {few(task_ids)}")
    problems, failing = rewards.check_solutions(problems, timeout=timeout)
    if not problems:
        raise CodeUpError(f"--data_path {data_path}: no problem's solution passes its own tests ({few(failing)})")
    if failing:
        logger.warning(f"dropped {len(failing)} problem(s) whose own solution fails their tests: {few(failing)}")
    logger.info(f"training on {len(problems)} problem(s)")
    return problems


def few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def prompt_dataset(problems: list[dict], *, prompter):
    """A datasets.Dataset of {"prompt": the problem asked as the model is asked later, "task_id"}."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompter.generate_prompt(p["prompt"]), "task_id": p["task_id"]} for p in problems])


def policy_model(*, base_model: str, lora_weights: str, load_in_8bit: bool, load_in_4bit: bool, dtype):
    """The base model, with the adapter to keep training where one is given (trainable)."""
    model = load_model(base_model, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, dtype=dtype)
    if load_in_8bit or load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not lora_weights:
        return model
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(Path(lora_weights).expanduser()), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CodeUpError(f"the LoRA adapter in {lora_weights} does not fit base model {base_model}: {first_line}") from error


def build_trainer(*, model, tokenizer, dataset, reward_function, new_adapter: dict | None, config: dict):
    from peft import LoraConfig
    from trl import GRPOConfig

    from utils.train.grpo import SandboxGRPOTrainer

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated")  # TRL's own field name
    args = GRPOConfig(logging_steps=1, gradient_checkpointing=False, remove_unused_columns=False,
                      reward_weights=[1.0, 0.0], save_strategy="steps", disable_tqdm=False, **config)
    peft_config = LoraConfig(**new_adapter, bias="none", task_type="CAUSAL_LM") if new_adapter else None
    return SandboxGRPOTrainer(model=model, reward_funcs=[reward_function, reward_function.pass_rate], args=args,
                              train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                              callbacks=[MarkCompleteCheckpoints()])


def template_record_of(*, prompt_template, lora_weights: str, prompt_format) -> dict:
    """What prompt_template.json says: the adapter's own record when its prompt was kept, else the one chosen."""
    record = read_template_record(lora_weights) if lora_weights and prompt_template is None else None
    if record:
        return {"name": record["name"], "template": record["template"]}
    if prompt_format == CHAT:
        return {"name": CHAT, "template": None}
    return {"name": Path(str(prompt_template or "alpaca")).stem, "template": prompt_format}


def plot_rewards(*, log_history: list[dict], path: Path, reward_name: str) -> None:
    """Mean reward and pass rate per step (reward.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [entry for entry in log_history if f"rewards/{reward_name}/mean" in entry]
    if not rows:
        return
    steps = [entry["step"] for entry in rows]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot(steps, [entry[f"rewards/{reward_name}/mean"] for entry in rows], label="mean reward")
    axes.plot(steps, [entry.get("rewards/pass_rate/mean", float("nan")) for entry in rows], label="pass rate", linestyle="--")
    axes.set_xlabel("step")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title("GRPO from unit tests", fontsize=9)
    axes.legend()
    figure.tight_layout()
    with replacing(path) as temp:
        figure.savefig(temp, dpi=100, format="png")
    plt.close(figure)


@functools.wraps(train)
def main(**flags):
    """The CLI: train, and return nothing (fire would print the trainer)."""
    train(**flags)


if __name__ == "__main__":
    run_cli(main, aliases={"prompt_template_name": "prompt_template"})
