"""Training stage: LoRA instruction tuning of a Llama-family model (8-bit or 4-bit base optional).

    python finetune.py --data_path data/codeup_19k.json --output_dir ./lora-codeup
    python finetune.py --base_model meta-llama/Llama-2-7b-hf --load_in_8bit \\
        --lora_target_modules '[q_proj,k_proj,v_proj,o_proj]' --lora_r 16 --micro_batch_size 16
    torchrun --nproc_per_node 2 finetune.py ...      # several processes (GPUs, or gloo on CPU)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml finetune.py ...   # the base sharded (FSDP)

The steps, top to bottom: check every flag and the data (before any model loads), tokenize with
the prompt masked out of the labels, load the base model, wrap it with LoRA, train with the
transformers Trainer (checkpoints, resume, DDP or FSDP, evaluation, logging), then save the adapter,
the trainer's state and loss.png in --output_dir. Under an FSDP launch configuration
(configs/accelerate/), utils/train/sharding.py decides before anything loads what the run does with
the base (shard it, train DDP instead, or refuse), and the run says it in one line.
"""

import functools
import importlib.util
import os
import re
from datetime import timedelta
from pathlib import Path

from utils.logs import logger, progress_bars_wanted  # first: it silences known-harmless notices the libraries print on import

import torch
import transformers
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from utils.train.attention import PER_EXAMPLE_SDPA, per_example_limits
from utils.chat_data import CHAT, chat_tokenizer_function, load_chat_records
from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.files import read_records, replacing
from utils.train.loss import head_of, head_skipped, linear_cross_entropy
from utils.model_loading import (
    DEFAULT_BASE_MODEL,
    fit_model_to_tokenizer,
    linear_module_names,
    load_model,
    load_tokenizer,
    resolve_model_reference,
)
from utils.train.speedups.packed_weights import packed_weight_of
from utils.precision import enable_tf32, resolve_precision, torch_dtype
from utils.train.sharding import (GatheredAdapterCheckpoints, FsdpPlan, fsdp_activation_checkpointing, fsdp_plan,
                                  fsdp_requested, launch_precision, save_gathered_adapter, use_fsdp_state)
from utils.prompter import Prompter
from utils.train.checkpoints import (CHECKPOINT_COMPLETE, MarkCompleteCheckpoints, find_checkpoint,  # noqa: F401
                                     is_complete_checkpoint, record_prompt_template)  # (tests read them here)
from utils.train.code_eval import CodeEvaluation
from utils.train.speedups import training_speedups
from utils.tokenization import has_trainable_labels, tokenize_for_training

def train(
    *,
    # model and data
    base_model: str = DEFAULT_BASE_MODEL,
    data_path: str = "data/codeup_19k.json",
    output_dir: str = "./lora-codeup",
    prompt_template: str = "alpaca",
    # training hyper-parameters
    batch_size: int = 128,
    micro_batch_size: int = 4,
    num_epochs: float = 3,
    max_steps: int = -1,
    learning_rate: float = 3e-4,
    warmup_steps: float = 100,
    cutoff_len: int = 512,
    val_set_size: int = 2000,
    seed: int = 42,
    optim: str = "adamw_torch",
    early_stopping_patience: int = 0,
    metric_for_best_model: str = "",
    # pass@k while training
    eval_task: str = "",
    eval_limit: int = 20,
    eval_max_new_tokens: int = 512,
    eval_max_seconds: float = 600,
    mbpp_path: str = "data/mbpp.jsonl",
    benchmarks_dir: str = "data/",
    # LoRA
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules=("q_proj", "v_proj"),
    # data handling
    train_on_inputs: bool = True,
    add_eos_token: bool = True,
    group_by_length: bool = False,
    packing: bool = True,
    # precision, memory and speed
    load_in_8bit: bool | None = None,
    load_in_4bit: bool = False,
    precision: str = "auto",
    gradient_checkpointing: bool | None = None,
    attn_implementation: str = "auto",
    cpu_speedups: bool = True,
    # checkpoints and logging
    save_steps: int = 200,
    eval_steps: int = 200,
    logging_steps: int = 10,
    save_total_limit: int = 3,
    resume_from_checkpoint=None,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    callbacks=(),
):
    """LoRA-tune BASE_MODEL on the instruction records in DATA_PATH and save the adapter.

    Args:
        base_model: hub id, local HF folder, .gguf file, or smollm2-135m (the embedded default).
        data_path: a JSON list / JSONL file of {instruction, input, output} records, or a hub dataset id.
        output_dir: where checkpoints, the adapter (adapter_model.safetensors), loss.png and the
            trainer's state go.
        prompt_template: a template in templates/, a path to a JSON template, or chat: the base
            tokenizer's own chat template, for Alpaca, OpenAI `messages` and ShareGPT
            `conversations` records (mixed; several files comma-separated), loss on assistant turns.
        batch_size: examples per optimizer step (all processes together).
        micro_batch_size: examples per forward pass and process; gradient accumulation makes up
            the difference: batch_size // micro_batch_size // number of processes.
        num_epochs: passes over the training data (ignored when max_steps > 0).
        max_steps: optimizer steps to run; -1 means num_epochs.
        learning_rate: peak learning rate (linear warmup, then linear decay).
        warmup_steps: warmup length in steps (a float below 1 is a share of all steps).
        cutoff_len: the longest example in tokens; longer ones are truncated.
        val_set_size: examples held out for evaluation (0: none; clamped to a tenth of small data).
        seed: seeds the data split, the shuffling, LoRA's initialization and dropout.
        optim: the optimizer, by its transformers name: adamw_torch, adamw_torch_fused,
            adamw_8bit or paged_adamw_8bit (bitsandbytes: 8-bit optimizer states; paged ones
            move to CPU memory when the GPU runs out), sgd, adafactor, ...
        early_stopping_patience: stop when the metric_for_best_model has not improved for this
            many evaluations, and save the best checkpoint's adapter (0: off; a checkpoint is then
            written at each evaluation).
        metric_for_best_model: keep the checkpoint best by this metric and save its adapter at the
            end (a checkpoint is then written at each evaluation): eval_loss (lower is better;
            needs val_set_size > 0) or eval_<task>_pass@1 of an --eval_task (higher is better).
            Default: none (the last is saved); with early stopping, eval_loss, or without a
            validation set the pass@1 of the one --eval_task.
        eval_task: pass@1 while training: at each evaluation (every eval_steps, with or without a
            validation set) the adapter answers the first eval_limit problems of these tasks
            (evaluate.py's: humaneval, mbpp, humanevalx-js, multiple-rs, ...; comma-separated)
            greedily in the training prompt, evaluate.py's sandbox runs the answers, and
            eval_<task>_pass@1 is logged beside eval_loss (trainer_state.json, --report_to,
            loss.png); the answers go to output_dir/eval_samples/step-N/. Default: none.
        eval_limit: problems per eval_task.
        eval_max_new_tokens: the longest answer in the pass@1 evaluation (as evaluate.py's
            --max_new_tokens).
        eval_max_seconds: generation time limit of each pass@1 evaluation; answers unfinished then
            count as failed (a warning says so).
        mbpp_path: MBPP as a jsonl file (for --eval_task mbpp), as evaluate.py takes it.
        benchmarks_dir: where data/download.py --benchmarks put humaneval-x/ and multipl-e/ (for the
            HumanEval-X and MultiPL-E eval_tasks).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling (the update is scaled by lora_alpha / lora_r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: the layers to adapt: names ('[q_proj,v_proj]', 'q_proj,v_proj', or
            dotted suffixes such as self_attn.q_proj), all-linear (every linear layer but the
            output head), or one regular expression matched against full module names
            ('.*layers\.[0-9]\..*(q|v)_proj').
        train_on_inputs: also learn the prompt (False: the loss covers the response only).
        add_eos_token: end every example with EOS, so the model learns to stop.
        group_by_length: batch examples of similar length together (less padding, faster).
        packing: padding-free batches: the examples of a micro-batch are concatenated into one
            row, with position ids restarting at each example so that none attends to another.
        load_in_8bit: 8-bit base (LLM.int8); default: on when CUDA is present, except under an
            FSDP launch configuration (an 8-bit base cannot be sharded: asking for it there is an error).
        load_in_4bit: 4-bit NF4 base (QLoRA); sharded with configs/accelerate/fsdp_qlora.yaml (FSDP1,
            the 4-bit weights stored in the compute dtype), not with FSDP2.
        precision: auto (bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32;
            the precision table in docs/hardware.md), bf16, fp16 or fp32. Under `accelerate
            launch`, auto is the configuration's mixed_precision when it names bf16 or fp16, and an
            explicit precision that disagrees with it is an error.
        gradient_checkpointing: recompute activations in the backward pass: much less memory,
            about a third slower. Default: on for an 8-bit or 4-bit base (the paper's setup: what
            lets 7B fit a 24 GB card), off otherwise. Under FSDP too this is the one activation
            checkpointing (a launch configuration with fsdp_activation_checkpointing is refused).
        attn_implementation: auto (packed rows: attention over each example alone, with
            flash_attention_2 on a GPU when installed, else sdpa_per_example; padded batches:
            sdpa; models with a sliding window, soft-capping or sinks: transformers' own),
            sdpa_per_example, sdpa, eager, flash_attention_2 or flex_attention.
        cpu_speedups: the training speed-ups (utils/train/speedups/: per-example attention, the
            chunked loss and, on a CPU, faster LoRA dropout, RMSNorm, rotary and packed frozen
            weights; the same results). False: transformers' and PEFT's own code throughout. The
            run prints one line saying which are on, which are off and why (with the base sharded
            by FSDP, the CPU kernels are off).
        save_steps: steps between checkpoints.
        eval_steps: steps between evaluations (when val_set_size > 0).
        logging_steps: steps between loss logs.
        save_total_limit: checkpoints to keep (the oldest are deleted).
        resume_from_checkpoint: a checkpoint folder, or True for the latest whole checkpoint in
            output_dir. A folder named explicitly may be a plain transformers checkpoint
            (no checkpoint_complete marker): it is used, with a warning.
        report_to: none, tensorboard or wandb.
        wandb_project: Weights & Biases project (setting it turns on report_to=wandb).
        wandb_run_name: run name shown in the logger.
        wandb_watch: wandb gradient logging: false, gradients or all.
        wandb_log_model: wandb model upload: false, end or checkpoint.
        callbacks: extra transformers TrainerCallback objects (from Python, not the CLI).
    """
    cuda = use_this_process_gpu()  # before any other CUDA call: each process on its own GPU
    target_modules = parse_target_modules(lora_target_modules)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    gradient_accumulation_steps = check_batch_sizes(
        batch_size=batch_size, micro_batch_size=micro_batch_size, world_size=world_size)
    report_to = configure_reporting(report_to=report_to, wandb_project=wandb_project,
                                    wandb_watch=wandb_watch, wandb_log_model=wandb_log_model)
    checkpoint = find_checkpoint(resume_from_checkpoint, output_dir=output_dir)
    check_optimizer(optim)
    # what an FSDP launch configuration does with this base: decided (and said, or refused) before loading
    sharding, load_in_8bit = plan_sharding(cuda=cuda, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                           eval_task=eval_task)
    precision = match_launch_precision(precision, cuda=cuda)
    check_checkpoint_sharding(checkpoint, sharded=sharding.sharded)
    code_evaluation = CodeEvaluation(
        tasks=parse_list(eval_task), limit=eval_limit, base_model=base_model, prompt_template=prompt_template,
        mbpp_path=mbpp_path, benchmarks_dir=benchmarks_dir, max_new_tokens=eval_max_new_tokens,
        max_seconds=eval_max_seconds) if eval_task else None
    best_metric = choose_best_metric(metric_for_best_model, early_stopping=early_stopping_patience > 0,
                                     validation=val_set_size > 0, code_evaluation=code_evaluation)
    precision, load_in_8bit, gradient_checkpointing = memory_plan(
        precision=precision, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
        gradient_checkpointing=gradient_checkpointing, cuda=cuda)
    model_reference = resolve_model_reference(base_model)
    attn_implementation = choose_attention(attn_implementation, packing=packing, cuda=cuda, cutoff_len=cutoff_len,
                                           config=transformers.AutoConfig.from_pretrained(model_reference),
                                           speedups=cpu_speedups)
    check_target_modules(target_modules, available=linear_module_names(model_reference))
    # every data error surfaces here, before the model loads; chat: Alpaca, messages and ShareGPT
    # records (mixed, comma-separated files) in the base tokenizer's chat template
    records = load_chat_records(data_path) if prompt_template == CHAT else load_records(data_path)
    if code_evaluation:
        code_evaluation.warn_about_overlap(records)

    if cuda:
        enable_tf32()
    if sharding.sharded:
        # The process group before the model, as transformers' loading under FSDP expects it (with
        # cpu_ram_efficient_loading, accelerate then broadcasts rank 0's weights as it shards them). The
        # Trainer's default ddp_timeout: a large base may take minutes to load while the others wait.
        from accelerate import PartialState

        PartialState(cpu=not cuda, timeout=timedelta(seconds=1800))
    transformers.set_seed(seed)
    tokenizer = load_tokenizer(base_model, padding_side="right")
    train_data, val_data = tokenize_records(
        records, tokenizer=tokenizer, template=prompt_template, cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs, add_eos_token=add_eos_token, val_set_size=val_set_size, seed=seed,
    )
    model = build_lora_model(
        base_model=base_model, tokenizer=tokenizer, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
        dtype=torch_dtype(precision), attn_implementation=attn_implementation,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        sharded=sharding.sharded,
        quant_storage=torch_dtype(precision) if sharding.quant_storage_as_compute_dtype else None,
    )
    args = build_training_arguments(
        output_dir=output_dir, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, num_epochs=num_epochs, max_steps=max_steps,
        learning_rate=learning_rate, warmup_steps=warmup_steps, optim=optim, precision=precision,
        gradient_checkpointing=gradient_checkpointing, reentrant_checkpointing=checkpoint_reentrant(model),
        group_by_length=group_by_length, evaluate=val_data is not None or code_evaluation is not None,
        best_metric=best_metric, save_steps=save_steps, eval_steps=eval_steps,
        logging_steps=logging_steps, save_total_limit=save_total_limit,
        report_to=report_to, run_name=wandb_run_name, seed=seed, world_size=world_size, cuda=cuda,
    )
    trainer = build_trainer(
        model=model, args=args, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
        packing=packing, early_stopping_patience=early_stopping_patience, callbacks=callbacks,
        code_evaluation=code_evaluation, sharding=sharding,
    )
    record_prompt_template(trainer, prompt_template=prompt_template, output_dir=output_dir)
    # The speed-ups (utils/train/speedups/: the same results, faster) are on for the training loop alone.
    with training_speedups(trainer, enabled=cpu_speedups, cutoff_len=cutoff_len, sharded=sharding.sharded):
        trainer.train(resume_from_checkpoint=checkpoint)
    save_outputs(trainer, output_dir=output_dir, sharded=sharding.sharded)
    return trainer


def plan_sharding(*, cuda: bool, load_in_8bit, load_in_4bit: bool, eval_task: str = "") -> tuple[FsdpPlan, bool | None]:
    """(plan, load_in_8bit): what the launch configuration does with this base
    (utils/train/sharding.fsdp_plan), said in one line on rank 0, or a CodeUpError. Under FSDP on a
    GPU, --load_in_8bit defaults to off (an 8-bit base cannot be sharded; asked for, it is the error).
    Where the run trains DDP instead, accelerate is told so (ACCELERATE_USE_FSDP off: its FSDP1 plugin
    refuses a CPU, and transformers would load the weights on rank 0 alone, which DDP never broadcasts)."""
    eight_bit_default_off = fsdp_requested() and cuda and load_in_8bit is None and not load_in_4bit
    if eight_bit_default_off:
        load_in_8bit = False
    plan = fsdp_plan(device_type="cuda" if cuda else "cpu", load_in_8bit=bool(load_in_8bit), load_in_4bit=load_in_4bit)
    if plan.error:
        raise CodeUpError(plan.line)
    if plan.sharded:
        if fsdp_activation_checkpointing():
            raise CodeUpError("the accelerate configuration turns on fsdp_activation_checkpointing: set it to false "
                              "and use finetune.py's --gradient_checkpointing (one mechanism, never both)")
        if eval_task:
            raise CodeUpError("--eval_task with the base sharded (FSDP): a sharded model generates only with every "
                              "process in step; score the checkpoints with evaluate.py instead")
        line = plan.line + ("; --load_in_8bit is off by default under FSDP (an 8-bit base cannot be sharded)"
                            if eight_bit_default_off else "")
        logger.info(line)
    elif plan.ddp_instead:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        logger.warning(plan.line)
    return plan, load_in_8bit


def check_checkpoint_sharding(checkpoint: str | None, *, sharded: bool) -> None:
    """A checkpoint resumes as it was written: a sharded (FSDP) run's (accelerate's
    pytorch_model_fsdp_0/ and optimizer_0/ folders) under FSDP only, an unsharded run's without it.
    Either checkpoint's adapter_model.safetensors is a normal adapter, for any stage."""
    if checkpoint is None:
        return
    fsdp_state = any(path.is_dir() and path.name.startswith("pytorch_model_fsdp")
                     for path in Path(checkpoint).iterdir())
    if fsdp_state and not sharded:
        raise CodeUpError(f"--resume_from_checkpoint {checkpoint}: a sharded (FSDP) checkpoint resumes only with the "
                          "base sharded again: accelerate launch with the configuration that wrote it")
    if sharded and not fsdp_state:
        raise CodeUpError(f"--resume_from_checkpoint {checkpoint}: not a sharded (FSDP) checkpoint; it resumes without "
                          "FSDP (python, torchrun or configs/accelerate/ddp.yaml)")


def match_launch_precision(precision: str, *, cuda: bool) -> str:
    """--precision, reconciled with the launch configuration's mixed_precision (what the Trainer would
    otherwise take from accelerate's environment): auto becomes the configuration's bf16 or fp16; an
    explicit precision that disagrees with it is an error. A configuration without one ("no")
    leaves --precision to decide."""
    asked = launch_precision()
    if asked is None or precision not in ("auto", "bf16", "fp16", "fp32"):
        return precision  # memory_plan names a bad --precision
    if asked == "fp16" and not cuda:
        raise CodeUpError("the accelerate configuration's mixed_precision fp16 needs a GPU: launch with "
                          "--mixed_precision bf16 or no on a CPU")
    if precision == "auto":
        return asked
    if precision != asked:
        raise CodeUpError(f"--precision {precision} disagrees with the accelerate configuration's mixed_precision "
                          f"{asked}: pass --precision {asked}, or launch with --mixed_precision "
                          f"{'no' if precision == 'fp32' else precision}")
    return precision


def memory_plan(*, precision: str, load_in_8bit, load_in_4bit: bool, gradient_checkpointing, cuda: bool):
    """(precision, load_in_8bit, gradient_checkpointing) with the defaults filled in: the precision
    utils/precision.py picks for this device; 8-bit on a GPU unless 4-bit is asked; gradient
    checkpointing for quantized bases (the paper's memory budget needs it)."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise CodeUpError(f"--precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    precision = resolve_precision(precision, stage="training", device="cuda" if cuda else "cpu")
    if load_in_8bit is None:
        load_in_8bit = cuda and not load_in_4bit
    if gradient_checkpointing is None:
        gradient_checkpointing = bool(load_in_8bit or load_in_4bit)
    return precision, load_in_8bit, gradient_checkpointing


def save_outputs(trainer, *, output_dir: str, sharded: bool = False) -> None:
    """The adapter (adapter_model.safetensors + adapter_config.json) and tokenizer, the trainer's
    state and loss.png; process 0 writes. With early stopping, the Trainer has loaded the best
    checkpoint back: that is what is saved. sharded (FSDP): the Trainer's save_model writes no
    adapter (SHARDED_STATE_DICT), or gathers the whole base first (FULL_STATE_DICT): the adapter alone
    is gathered instead (every process takes part) and written as an unsharded run writes it."""
    if sharded:
        save_gathered_adapter(trainer.model, output_dir)
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(output_dir)
            torch.save(trainer.args, Path(output_dir) / transformers.trainer.TRAINING_ARGS_NAME)
    else:
        trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        plot_losses(log_history=trainer.state.log_history, path=Path(output_dir) / "loss.png")
        print(f"Saved the LoRA adapter, trainer_state.json and loss.png in {output_dir}")


def use_this_process_gpu() -> bool:
    """Whether CUDA is here; under torchrun, makes LOCAL_RANK's GPU this process's current device
    first, so that no later query (precision, memory) opens a context on GPU 0 from every rank."""
    if not torch.cuda.is_available():
        return False
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


# ---- checks that run before anything heavy ----------------------------------------------

def choose_best_metric(name: str, *, early_stopping: bool, validation: bool, code_evaluation) -> str | None:
    """The metric that picks the checkpoint kept (None: the last), checked against what the
    evaluations log: eval_loss with a validation set, eval_<task>_pass@1 with --eval_task."""
    logged = (["eval_loss"] if validation else []) + (code_evaluation.metric_names() if code_evaluation else [])
    if not name:
        if not early_stopping:
            return None
        if validation:
            return "eval_loss"
        if len(logged) == 1:
            return logged[0]
        if not logged:
            raise CodeUpError("--early_stopping_patience needs an evaluation to watch: a validation set "
                              "(--val_set_size above 0) or --eval_task")
        raise CodeUpError(f"--early_stopping_patience: say which metric to watch with --metric_for_best_model "
                          f"({', '.join(logged)})")
    name = name if name.startswith("eval_") else f"eval_{name}"
    if name not in logged:
        raise CodeUpError(f"--metric_for_best_model {name}: no evaluation logs it; "
                          + (f"they log {', '.join(logged)}" if logged else
                             "set --val_set_size above 0 (eval_loss) or --eval_task (eval_<task>_pass@1)"))
    return name


def check_batch_sizes(*, batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """The gradient accumulation steps that make up batch_size."""
    if micro_batch_size < 1 or batch_size < micro_batch_size * world_size:
        raise CodeUpError(
            f"--batch_size ({batch_size}) must be at least --micro_batch_size ({micro_batch_size}) "
            f"times the number of processes ({world_size})"
        )
    steps = batch_size // micro_batch_size // world_size
    if steps * micro_batch_size * world_size != batch_size:
        logger.warning(f"batch_size {batch_size} is not a multiple of micro_batch_size x processes: "
                      f"each step uses {steps * micro_batch_size * world_size} examples")
    return steps


REGEX_CHARACTERS = set("*+?|()[]{}^$\\")


def parse_target_modules(value) -> str | list[str]:
    """`all-linear` or a regular expression (PEFT takes both as one string), else a list of names."""
    if isinstance(value, str) and (value.strip() == "all-linear" or REGEX_CHARACTERS & set(value.strip().strip("[]"))):
        return value.strip()
    return parse_list(value)


def check_target_modules(target_modules: str | list[str], available: set[str]) -> None:
    """Refuse target modules that would adapt nothing. available: the full dotted names of the
    model's linear layers. A name matches as PEFT matches it: the whole name or a dotted suffix."""
    if not target_modules:
        raise CodeUpError("--lora_target_modules names no module")
    if target_modules == "all-linear":
        return
    short_names = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in available}))
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as error:
            raise CodeUpError(f"--lora_target_modules {target_modules!r} is not a valid regular expression: {error}") from error
        if not any(pattern.fullmatch(name) for name in available):
            raise CodeUpError(f"--lora_target_modules: the pattern {target_modules!r} matches no linear layer "
                              f"(full names such as {min(available)}); its linear layers are {short_names}")
        return
    unknown = [target for target in target_modules
               if not any(name == target or name.endswith("." + target) for name in available)]
    if unknown:
        raise CodeUpError(
            f"--lora_target_modules: the model has no module named {', '.join(unknown)}; "
            f"its linear layers are {short_names}"
        )


def check_optimizer(optim: str) -> None:
    names = [name.value for name in transformers.training_args.OptimizerNames]
    if optim not in names:
        raise CodeUpError(f"--optim {optim!r} is not a transformers optimizer; choose one of {', '.join(names)}")
    if "8bit" in optim or "bnb" in optim or optim.startswith("paged_"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CodeUpError(f"--optim {optim} needs bitsandbytes: pip install bitsandbytes")


ATTENTION_CHOICES = ("auto", PER_EXAMPLE_SDPA, "sdpa", "eager", "flash_attention_2", "flex_attention")


def choose_attention(name: str, *, packing: bool, cuda: bool, config=None, cutoff_len: int = 256,
                     speedups: bool = True) -> str:
    """The attention kernel. Packed rows need attention that keeps examples apart without a dense
    mask over the whole row: flash-attention 2 on a GPU (variable-length kernel) when installed,
    else SDPA on each example alone (utils/train/attention.py), except for a model (config) whose
    attention that would not compute (a sliding window, soft-capping, sinks: per_example_limits),
    which keeps transformers' own (a mask over each packed row, from its position ids), as does
    every model without the speed-ups (utils/train/speedups/'s line says which and why)."""
    if name not in ATTENTION_CHOICES:
        raise CodeUpError(f"--attn_implementation must be one of {', '.join(ATTENTION_CHOICES)}, not {name!r}")
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    if name == "flash_attention_2" and not (cuda and flash_installed):
        raise CodeUpError("--attn_implementation flash_attention_2 needs a GPU and the flash-attn package "
                          "(pip install flash-attn --no-build-isolation)")
    if name != "auto":
        return name
    if not packing:
        return "sdpa"
    if cuda and flash_installed:
        return "flash_attention_2"
    if config is not None and (limit := per_example_limits(config, cutoff_len=cutoff_len)):
        return limit[0]
    return PER_EXAMPLE_SDPA if speedups else "sdpa"


def configure_reporting(*, report_to: str, wandb_project: str, wandb_watch: str, wandb_log_model: str) -> str:
    if wandb_project:
        report_to = "wandb"
        os.environ["WANDB_PROJECT"] = wandb_project
    if wandb_watch:
        os.environ["WANDB_WATCH"] = wandb_watch
    if wandb_log_model:
        os.environ["WANDB_LOG_MODEL"] = wandb_log_model
    if report_to not in ("none", "tensorboard", "wandb"):
        raise CodeUpError(f"--report_to must be none, tensorboard or wandb, not {report_to!r}")
    return report_to


def load_records(data_path: str):
    """The records as a datasets.Dataset with string instruction, input and output columns."""
    from datasets import load_dataset  # here: the GPU benchmark imports this module without datasets

    path = Path(str(data_path)).expanduser()
    try:
        if path.suffix in (".json", ".jsonl"):
            if not path.exists():
                raise CodeUpError(f"data file not found: {path} (run data/preprocess.py, or pass --data_path)")
            # utils/files.py names what is wrong with a bad file (binary, truncated, a folder)
            read_records(path, what="--data_path")
            records = load_dataset("json", data_files=str(path), split="train")
        elif path.exists():
            raise CodeUpError(f"--data_path {path}: expected a .json or .jsonl file")
        else:
            records = load_dataset(str(data_path), split="train")
    except CodeUpError:
        raise
    except Exception as error:  # datasets raises many kinds; all mean "cannot read this data"
        raise CodeUpError(f"cannot read --data_path {data_path}: {str(error).splitlines()[0]}") from error

    missing = [column for column in ("instruction", "output") if column not in records.column_names]
    if missing:
        raise CodeUpError(f"{data_path}: the records have no {' or '.join(missing)} field")
    if "input" not in records.column_names:
        records = records.add_column("input", [""] * len(records))
    bad = [
        i for i, (instruction, input_text, output) in enumerate(zip(records["instruction"], records["input"], records["output"]))
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(input_text, (str, type(None)))
    ]
    if bad:
        raise CodeUpError(f"{data_path}: {len(bad)} record(s) lack a string instruction or output (first: record {bad[0]})")
    if len(records) == 0:
        raise CodeUpError(f"{data_path} has no records")
    return records.select_columns(["instruction", "input", "output"])


# ---- data -------------------------------------------------------------------------------

def tokenize_records(records, *, tokenizer, template, cutoff_len, train_on_inputs, add_eos_token, val_set_size, seed):
    """Split off the validation set, then tokenize (prompt masked unless train_on_inputs)."""
    prompter = None if template == CHAT else Prompter(template)

    def tokenize(record):
        prompt = prompter.generate_prompt(record["instruction"], record["input"])
        return tokenize_for_training(tokenizer, prompt, record["output"], cutoff_len=cutoff_len,
                                     train_on_inputs=train_on_inputs, add_eos_token=add_eos_token)

    if template == CHAT:  # the loss on assistant turns only; EOS is the template's end of turn
        tokenize = chat_tokenizer_function(tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)

    if val_set_size > 0 and val_set_size >= len(records) // 2:
        clamped = max(1, len(records) // 10) if len(records) >= 2 else 0
        logger.warning(f"val_set_size {val_set_size} is too large for {len(records)} records; using {clamped}")
        val_set_size = clamped
    splits = records.train_test_split(test_size=val_set_size, shuffle=True, seed=seed) if val_set_size > 0 else None
    parts = [splits["train"], splits["test"]] if splits else [records, None]
    tokenized = []
    for part in parts:
        if part is None:
            tokenized.append(None)
            continue
        part = part.map(tokenize, remove_columns=part.column_names, desc="Tokenizing")
        trainable = part.filter(has_trainable_labels, desc="Dropping examples with no label")
        if len(trainable) < len(part):
            logger.warning(f"{len(part) - len(trainable)} example(s) have a prompt longer than cutoff_len "
                          f"({cutoff_len} tokens) and nothing left to learn; they are skipped")
        tokenized.append(trainable)
    if len(tokenized[0]) == 0:
        raise CodeUpError("no training example is left: raise --cutoff_len")
    return tokenized[0], tokenized[1]


# ---- model ------------------------------------------------------------------------------

def build_lora_model(*, base_model, tokenizer, load_in_8bit, load_in_4bit, dtype, lora_r, lora_alpha, lora_dropout,
                     target_modules, attn_implementation=PER_EXAMPLE_SDPA, sharded=False, quant_storage=None):
    """sharded: for FSDP (load_model's sharded; quant_storage: the 4-bit weights' storage dtype)."""
    model = load_model(base_model, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, dtype=dtype,
                       attn_implementation=attn_implementation, sharded=sharded, quant_storage=quant_storage)
    fit_model_to_tokenizer(model=model, tokenizer=tokenizer)
    return add_lora(model, quantized=load_in_8bit or load_in_4bit, lora_r=lora_r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, target_modules=target_modules, sharded=sharded)


def add_lora(model, *, quantized, lora_r, lora_alpha, lora_dropout, target_modules, sharded=False):
    """The base model, frozen, with LoRA adapters on target_modules (a PeftModel)."""
    # No KV cache while training: it is useless there, and without it the attention masks of
    # packed rows follow the position ids (no example attends to another).
    model.config.use_cache = False
    # A sharded 4-bit base (FSDP1 QLoRA) keeps its norms and embeddings in the compute dtype, as TRL
    # does for it: FSDP1 flattens each decoder layer's weights into one tensor of one dtype, which
    # prepare_model_for_kbit_training's float32 norms would break (get_peft_model freezes the base).
    if quantized and not sharded:
        # Freezes the base and keeps norms in fp32. Checkpointing is left to the Trainer, so that
        # it is turned on once (PEFT's and then the Trainer's would be twice), of the kind that
        # checkpoint_reentrant picks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


# ---- training ---------------------------------------------------------------------------

def checkpoint_reentrant(model) -> bool:
    """Whether activation checkpointing must be reentrant for this model: for an 8-bit base.

    bitsandbytes' 8-bit matmul keeps its input as an attribute of its autograd context, not through
    save_for_backward, so non-reentrant checkpointing (which frees only what passes its saved-tensor
    hooks) cannot free it: measured on an H100, most of a Llama-2-7B layer's activations stayed alive
    with checkpointing on (bench/RESULTS.md). Reentrant checkpointing runs the forward without autograd, so
    nothing stays; it is also what PEFT's prepare_model_for_kbit_training turns on by default."""
    return bool(getattr(model, "is_loaded_in_8bit", False))


# transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def build_training_arguments(*, output_dir, micro_batch_size, gradient_accumulation_steps, num_epochs, max_steps,
                             learning_rate, warmup_steps, optim, precision, gradient_checkpointing,
                             reentrant_checkpointing, group_by_length, evaluate, best_metric=None, save_steps,
                             eval_steps, logging_steps, save_total_limit, report_to, run_name, seed, world_size, cuda):
    """Every Trainer setting of a finetune.py run, in one place. best_metric: the metric that picks
    the checkpoint kept (choose_best_metric), or None for the last."""
    if best_metric and save_steps != eval_steps:
        # The best checkpoint can only be kept if one is written at each evaluation.
        logger.warning(f"keeping the best checkpoint by {best_metric}: saving one at each evaluation (every "
                       f"{eval_steps} steps) instead of every {save_steps}")
        save_steps = eval_steps
    return transformers.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        optim=optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Non-reentrant (torch's recommendation) unless the base needs reentrant: see checkpoint_reentrant.
        **{CHECKPOINTING: gradient_checkpointing,
           f"{CHECKPOINTING}_kwargs": {"use_reentrant": reentrant_checkpointing} if gradient_checkpointing else None},
        use_cpu=not cuda,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        load_best_model_at_end=best_metric is not None,
        metric_for_best_model=best_metric,
        greater_is_better=best_metric.endswith("pass@1") if best_metric else None,
        report_to=report_to,
        run_name=run_name or None,
        seed=seed,
        data_seed=seed,
        ddp_find_unused_parameters=False if world_size > 1 else None,
        remove_unused_columns=False,
        disable_tqdm=not progress_bars_wanted(),  # a log file gets the loss lines, not \r fragments
    )


def build_trainer(*, model, args, tokenizer, train_data, val_data, packing, early_stopping_patience=0, callbacks=(),
                  code_evaluation=None, sharding: FsdpPlan | None = None):
    """sharding: the FSDP plan (plan_sharding); with the base sharded, each checkpoint also gets the
    gathered adapter (before its completion marker, which comes last)."""
    if packing:
        collator = transformers.DataCollatorWithFlattening()
    else:
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    sharded = sharding is not None and sharding.sharded
    own_callbacks = [GatheredAdapterCheckpoints()] * sharded + [MarkCompleteCheckpoints()]
    if early_stopping_patience:
        own_callbacks.append(transformers.EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*own_callbacks, *callbacks],
        code_evaluation=code_evaluation,
        switch_to_fsdp=sharding is not None and sharding.switch_state,
    )


class Trainer(transformers.Trainer):
    """transformers' Trainer, with the training loss computed without the full logits
    (utils/train/loss.py: the same loss, a fraction of the memory; tokens without a label get no
    logits). Evaluation, and architectures whose logits are more than the head's output, keep
    transformers' own loss. With a code_evaluation (--eval_task), each evaluation also logs
    eval_<task>_pass@1 (utils/train/code_eval.py), in the same entry as eval_loss, or alone when
    there is no validation set. switch_to_fsdp: train sharded where accelerate would train DDP (FSDP2
    on CPUs: utils/train/sharding.fsdp_plan)."""

    chunked_loss = True  # utils/train/speedups/ turns it off with the other speed-ups

    def __init__(self, *args, code_evaluation=None, switch_to_fsdp=False, **kwargs):
        self.code_evaluation = code_evaluation
        self.switch_to_fsdp = switch_to_fsdp
        arguments = kwargs["args"]
        if code_evaluation is None or kwargs.get("eval_dataset") is not None:
            super().__init__(*args, **kwargs)
            return
        # transformers refuses to evaluate without an eval_dataset; here an evaluation is the pass@1 alone.
        strategy, arguments.eval_strategy = arguments.eval_strategy, "no"
        try:
            super().__init__(*args, **kwargs)
        finally:
            arguments.eval_strategy = strategy

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.switch_to_fsdp and not self.is_fsdp_enabled:
            use_fsdp_state(self.accelerator)  # accelerate's own FSDP preparation, saving and resuming from here on
            self.is_fsdp_enabled = True

    def code_metrics(self) -> dict[str, float]:
        return self.code_evaluation.score(self.model, step=self.state.global_step, output_dir=self.args.output_dir)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.code_evaluation is not None and metric_key_prefix == "eval":
            output.metrics.update(self.code_metrics())
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.code_evaluation is None or eval_dataset is not None or self.eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics = self.code_metrics()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = head_of(self.accelerator.unwrap_model(model))
        # A mixture of experts that adds its router's load-balancing loss (output_router_logits) gets it
        # from the model's own forward with labels: the chunked loss would drop it.
        router_loss = getattr(self.accelerator.unwrap_model(model).config, "output_router_logits", False)
        if (not self.chunked_loss or return_outputs or head is None or "labels" not in inputs or self.label_smoother is not None
                or self.compute_loss_func is not None or self.args.n_gpu > 1 or router_loss):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        features = {name: value for name, value in inputs.items() if name != "labels"}
        with head_skipped(head):
            hidden_states = model(**features).logits
        # The head under the mixed precision the model's forward ran in (accelerate autocasts the
        # forward alone): a quantized base keeps its head in float32, and out of autocast the head's
        # matmuls ran in float32 (a large share of a profiled GPU step: bench/RESULTS.md).
        with self.accelerator.autocast():
            loss = linear_cross_entropy(hidden_states, head.weight, inputs["labels"],
                                        num_items_in_batch=num_items_in_batch, packed=packed_weight_of(head))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss does
        return loss


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(8, 5))
    if train:
        axes.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval loss", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    # --eval_task: each task's pass@1 on a second axis (0-100%), beside the losses
    scores = sorted({name for entry in log_history for name in entry if name.endswith("_pass@1")})
    if scores:
        right = axes.twinx()
        for name, color in zip(scores, ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"] * 3):
            points = [(entry["step"], 100 * entry[name]) for entry in log_history if name in entry]
            right.plot(*zip(*points), label=name.removeprefix("eval_"), marker="s", linestyle="--", color=color)
        right.set_ylabel("pass@1 (%)")
        right.set_ylim(0, 100)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        axes.legend(handles, labels)
    figure.tight_layout()
    with replacing(path) as temp:  # a killed run never leaves half a picture
        figure.savefig(temp, dpi=100, format="png")
    plt.close(figure)


@functools.wraps(train)
def main(**flags):
    """The CLI: train, and return nothing (fire would print the trainer)."""
    train(**flags)

if __name__ == "__main__":
    run_cli(main, aliases={"prompt_template_name": "prompt_template"})
