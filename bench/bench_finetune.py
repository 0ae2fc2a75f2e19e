"""Training speed and memory: finetune.py against TRL's SFTTrainer in its fastest mode and its defaults.

    .venv/bin/python bench/bench_finetune.py [--steps 6] [--rounds 2] [--records 256]

Trainers, each run in its own process (so peak memory is its own), alternating (ours, ...,
TRL defaults, ours, ...) so that drift in the machine's speed (other work on it) hits all alike:
  - finetune.py with its defaults (packed rows, attention over each example alone, no activation
    checkpointing on a full-precision base), and with --gradient_checkpointing True (memory
    against TRL's default, which checkpoints);
  - TRL SFTTrainer with `padding_free=True` (no padding, one row a micro-batch; TRL then requires
    max_length=None, so the records are those that neither side truncates at --cutoff_len), with
    its default activation checkpointing and without it (its fastest mode on a CPU);
  - TRL SFTTrainer with its defaults (padded batches).
All train SmolLM2-135M (or --base_model) with LoRA r=8 on q_proj,v_proj, micro-batches of 4,
gradient accumulation to 16, the same precision (utils/precision.py: bf16 on CPUs with native
bf16), on the first --records such records of Code Alpaca, for --steps steps. Reported (medians):
  - tokens/s: real (non-pad) tokens fed to the model during trainer.train(), divided by its time
    (both from the Trainer's on_train_begin to its on_train_end);
  - peak RSS of the process (and peak GPU memory on CUDA);
  - achieved FLOP/s, as a share of the matmul peak of the same precision measured in this run: the
    useful work, counted the same for every trainer, over time. 4 x parameters x tokens (forward +
    input gradients; the frozen base needs no weight gradients), plus causal attention: per example
    of n tokens and per layer, 2 x heads x head_dim x n(n + 1) in the forward pass (the n(n + 1)/2
    query-key pairs, QKᵀ and PV) and twice that in the backward pass. Padding and masked-out pairs
    are not counted. For SmolLM2 on these records attention is about 3% of the total; the rows in
    bench/RESULTS.md before its "sixth pass" rerun of 2026-11-27 left it out.
Prints a Markdown table for bench/RESULTS.md.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402
from machine import cpu_name  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
SETTINGS = dict(micro_batch_size=4, batch_size=16, learning_rate=3e-4)
TRAINERS = {
    "ours": "finetune.py (its defaults: packed rows, per-example attention, no checkpointing)",
    "ours_checkpointing": "finetune.py --gradient_checkpointing True",
    "trl_padding_free": "TRL SFTTrainer, padding_free=True (its default checkpointing on)",
    "trl_padding_free_fast": "TRL SFTTrainer, padding_free=True, gradient_checkpointing=False (its fastest mode here)",
    "trl_defaults": "TRL SFTTrainer (its defaults: padded batches, checkpointing on)",
}
# What a plain run compares (the other rows: --trainers ours,ours_checkpointing,...).
DEFAULT_TRAINERS = "ours,ours_checkpointing,trl_padding_free,trl_padding_free_fast,trl_defaults"


class TokenCounter:
    """Counts the real tokens of every training forward pass (packed rows have no padding; padded
    batches count their attention mask), and the sum of n(n + 1) over its examples of n tokens (the
    causal attention work: packed rows split where the position ids restart, a padded row is one
    example)."""

    def __init__(self, model):
        self.tokens = self.causal_pairs = 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        from utils.train.attention import example_spans

        if not module.training:
            return
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            lengths = mask.sum(-1).tolist()
        elif positions is not None:
            lengths = [end - start for row in positions for start, end in example_spans(row)]
        else:
            lengths = [ids.shape[-1]] * ids[..., 0].numel()
        self.tokens += sum(lengths)
        self.causal_pairs += sum(n * (n + 1) for n in lengths)


def training_flops(config, *, parameters: int, tokens: int, causal_pairs: int) -> float:
    """The useful FLOPs of LoRA training on a frozen base (see the module docstring)."""
    config = getattr(config, "text_config", config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * head_dim * causal_pairs
    return 4 * parameters * tokens + attention


def precision_name() -> str:
    import torch

    from utils.precision import resolve_precision

    return resolve_precision("auto", stage="training", device="cuda" if torch.cuda.is_available() else "cpu")


def training_window():
    """A TrainerCallback timing trainer.train() from its on_train_begin to its on_train_end, and
    counting the real tokens in between: the same window for every trainer (not finetune.py's saving
    of the adapter and loss plot after it, nor accelerate's preparation before)."""
    import transformers

    class TrainingWindow(transformers.TrainerCallback):
        counter = started = ended = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.counter = TokenCounter(model)
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.ended = time.perf_counter()

    return TrainingWindow()


def run_ours(base_model, data_file, output_dir, steps, cutoff_len, gradient_checkpointing=False):
    import finetune

    window = training_window()
    trainer = finetune.train(
        base_model=base_model, data_path=data_file, output_dir=output_dir, max_steps=steps, warmup_steps=0,
        val_set_size=0, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        lora_target_modules=LORA["target_modules"], save_steps=10_000, logging_steps=1, cutoff_len=cutoff_len,
        gradient_checkpointing=gradient_checkpointing, callbacks=[window], **SETTINGS,
    )
    return trainer.model, window.counter, window.ended - window.started


def run_trl(base_model, data_file, output_dir, steps, cutoff_len, padding_free, gradient_checkpointing=True):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from utils.model_loading import load_model_and_tokenizer
    from utils.precision import torch_dtype
    from utils.prompter import Prompter

    prompter = Prompter()
    records = load_dataset("json", data_files=data_file, split="train")
    dataset = records.map(lambda r: {"prompt": prompter.generate_prompt(r["instruction"], r["input"]),
                                     "completion": r["output"]}, remove_columns=records.column_names)
    precision = precision_name()
    model, tokenizer = load_model_and_tokenizer(base_model, dtype=torch_dtype(precision))
    config = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=SETTINGS["micro_batch_size"],
        gradient_accumulation_steps=SETTINGS["batch_size"] // SETTINGS["micro_batch_size"],
        learning_rate=SETTINGS["learning_rate"], bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=1,
        # padding-free without packing needs max_length=None (the records are short enough).
        padding_free=padding_free, max_length=None if padding_free else cutoff_len,
        gradient_checkpointing=gradient_checkpointing,  # SFTConfig's default: True
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    window = training_window()
    trainer.add_callback(window)
    trainer.train()
    return trainer.model, window.counter, window.ended - window.started


def child(which: str, base_model: str, data_file: str, output_dir: str, steps: int, cutoff_len: int):
    """One training run; prints its measurements as JSON on the last line."""
    import torch

    if which.startswith("ours"):
        model, counter, seconds = run_ours(base_model, data_file, output_dir, steps, cutoff_len,
                                           gradient_checkpointing=which == "ours_checkpointing")
    else:
        model, counter, seconds = run_trl(base_model, data_file, output_dir, steps, cutoff_len,
                                          padding_free=which.startswith("trl_padding_free"),
                                          gradient_checkpointing=which != "trl_padding_free_fast")
    parameters = sum(p.numel() for p in model.parameters())
    flops = training_flops(model.config, parameters=parameters, tokens=counter.tokens, causal_pairs=counter.causal_pairs)
    result = {
        "which": which, "tokens": counter.tokens, "seconds": seconds, "tokens_per_second": counter.tokens / seconds,
        "flops_per_second": flops / seconds, "attention_share_of_flops": 1 - 4 * parameters * counter.tokens / flops,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print(json.dumps(result))


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul in this process: the machine's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started)


def untruncated_records(data_file: str, base_model: str, count: int, cutoff_len: int) -> list[dict]:
    """The first `count` records whose prompt + output + EOS fit cutoff_len tokens."""
    from utils.model_loading import load_tokenizer
    from utils.prompter import Prompter
    from utils.tokenization import tokenize_for_training

    tokenizer, prompter = load_tokenizer(base_model), Prompter()
    kept = []
    for record in json.loads(Path(data_file).read_text()):
        prompt = prompter.generate_prompt(record["instruction"], record.get("input", ""))
        if len(tokenize_for_training(tokenizer, prompt, record["output"], cutoff_len=10**6)["input_ids"]) < cutoff_len:
            kept.append(record)
            if len(kept) == count:
                break
    return kept


def main(
    base_model: str = "smollm2-135m",
    data_file: str = str(ROOT.parent / "shared" / "data" / "code_alpaca_20k.json"),
    records: int = 256,
    steps: int = 6,
    rounds: int = 2,
    cutoff_len: int = 512,
    trainers: str = DEFAULT_TRAINERS,
    work_dir: str = "/tmp/codeup-bench-finetune",
    child_run: str = "",
):
    """Alternate finetune.py, TRL padding-free and TRL defaults `rounds` times each; print the table."""
    if child_run:
        return child(child_run, base_model, data_file, work_dir, steps, cutoff_len)

    import torch

    chosen = [name.strip() for name in trainers.split(",") if name.strip()] if isinstance(trainers, str) else list(trainers)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sliced = work / "records.json"
    sliced.write_text(json.dumps(untruncated_records(data_file, base_model, records, cutoff_len)))
    precision = precision_name()
    peak = matmul_peak({"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision])

    results = {which: [] for which in chosen}
    for round_number in range(rounds):
        for which in chosen:
            command = [sys.executable, __file__, "--child_run", which, "--base_model", base_model,
                       "--data_file", str(sliced), "--work_dir", str(work / f"{which}-{round_number}"),
                       "--steps", str(steps), "--cutoff_len", str(cutoff_len)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"{which} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[which].append(result)
            print(f"round {round_number + 1} {which}: {result['tokens_per_second']:.0f} tokens/s, "
                  f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    def median(which, key):
        values = [r[key] for r in results[which] if r[key] is not None]
        return statistics.median(values) if values else None

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; precision {precision}; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s ({precision}, 2048x2048)")
    print(f"model {base_model}, {records} Code Alpaca records under {cutoff_len} tokens, {steps} steps of 16 examples, "
          f"{rounds} alternating rounds (medians)")
    print()
    print("| trainer | tokens/s | train seconds | peak RSS (MB) | peak GPU (MB) | FLOP/s share of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for which in chosen:
        gpu = median(which, "peak_gpu_mb")
        print(f"| {TRAINERS[which]} | {median(which, 'tokens_per_second'):.0f} | {median(which, 'seconds'):.1f} | "
              f"{median(which, 'peak_rss_mb'):.0f} | {'-' if gpu is None else f'{gpu:.0f}'} | "
              f"{median(which, 'flops_per_second') / peak:.0%} |")
    print()
    print(f"Causal attention is {median(chosen[0], 'attention_share_of_flops'):.1%} of the FLOPs counted ({chosen[0]}).")
    if "ours" in results:
        for baseline in [name for name in chosen if not name.startswith("ours")]:
            print(f"finetune.py against {baseline}: {median('ours', 'tokens_per_second') / median(baseline, 'tokens_per_second'):.2f}x "
                  f"the tokens/s at {median('ours', 'peak_rss_mb') / median(baseline, 'peak_rss_mb'):.2f}x the peak RSS")


if __name__ == "__main__":
    fire.Fire(main)
