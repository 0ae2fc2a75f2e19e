"""The paper's GPU setting, measured: 7B-shaped models, LoRA on an 8-bit or 4-bit base, finetune.py against TRL.

    python bench/bench_gpu.py --output gpu_table.md          # one GPU, a few minutes
    python bench/bench_gpu.py --tiny                         # a tiny config on a CPU (the test suite)

Models: built from Llama-2-7B's and Qwen2.5-Coder-7B's configs (written below: no download) with
random weights, quantized in memory by bitsandbytes (8-bit LLM.int8, or 4-bit NF4 with double
quantization and bf16/fp16 compute). Each base is built once and shared by its rows: LoRA r=16 on
q/k/v/o, micro-batches of 16 examples x 512 tokens (fixed length: the memory budget's worst
case), activation checkpointing off and on; finetune.py's own path (add_lora,
build_training_arguments, build_trainer: packed rows, per-example attention) against TRL's
SFTTrainer in its fastest mode here (padding-free with flash-attention 2 when installed; else its
padded batches, which hold no padding at fixed length and run SDPA's causal kernels). Reported:
peak GPU memory (torch.cuda.max_memory_allocated, from the model build on) and tokens/s over the
steps after the first. A row that runs out of memory is reported as such; the run goes on.
Rows are printed (and appended to --output) as each finishes, so a cut-off run keeps what it has.
With --min_length, examples have --min_length to --length tokens (seeded), as real records do:
finetune.py packs each micro-batch into one row, TRL pads it to its longest, and tokens/s counts
real tokens only; the `finetune.py-per-example` row is finetune.py with varlen attention off
(one SDPA call per example), to measure what varlen gives.

Needs torch, transformers, peft, accelerate, bitsandbytes, and for TRL's rows trl and datasets
(skipped with a note when they cannot be imported); not fire.
"""

import argparse
import contextlib
import gc
import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import finetune  # noqa: E402
from utils.train import attention  # noqa: E402
from utils.train.speedups import training_speedups  # noqa: E402
from utils.precision import enable_tf32, resolve_precision, torch_dtype  # noqa: E402

# The architecture fields of the published config.json files.
MODELS = {
    "Llama-2-7B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    ),
    "Qwen2.5-Coder-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu",
    ),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
TRAINERS = ("finetune.py", "finetune.py-per-example", "TRL")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def model_config(name: str, tiny: bool):
    spec = dict(MODELS[name])
    if tiny:
        spec.update(TINY, num_key_value_heads=2 if spec["num_key_value_heads"] < spec["num_attention_heads"] else 4)
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def random_quantized_model(config, *, bits: int, dtype: torch.dtype, device: str):
    """A model of `config` with random weights whose linear layers (but the output head) are
    bitsandbytes 8-bit or 4-bit layers, built layer by layer on `device` (no full-precision copy
    of the whole model is ever held)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if len(list(child.children())) or not list(child.parameters(recurse=False)) or child_name == "lm_head":
                continue
            if isinstance(child, torch.nn.Linear):
                weight = torch.randn(child.out_features, child.in_features, dtype=dtype, device=device) * 0.02
                if bits == 8:
                    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, threshold=6.0, device="meta")
                    layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
                else:
                    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                              device="meta")
                    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device),
                                                    requires_grad=False)
                layer = layer.to(device)  # bitsandbytes quantizes here
                del weight
            else:  # embeddings, norms
                layer = child.to_empty(device=device)
                for parameter in layer.parameters(recurse=False):
                    torch.nn.init.normal_(parameter, std=0.02) if parameter.dim() > 1 else torch.nn.init.ones_(parameter)
            setattr(module, child_name, layer)
    head = model.lm_head.to_empty(device=device)
    torch.nn.init.normal_(head.weight, std=0.02)
    rotary = model.model.rotary_emb  # its inverse frequencies are computed, not loaded
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    # What prepare_model_for_kbit_training reads (from_pretrained would set them).
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = bits == 8, bits == 4
    return model


def token_rows(vocab_size: int, *, count: int, length: int, min_length: int | None = None) -> list[dict]:
    """`count` random examples of `length` tokens, or of min_length to length tokens (seeded)."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(3, vocab_size, (count, length), generator=generator).tolist()
    if min_length is not None and min_length < length:
        lengths = torch.randint(min_length, length + 1, (count,), generator=generator).tolist()
        rows = [row[:n] for row, n in zip(rows, lengths)]
    return [{"input_ids": row, "labels": list(row), "attention_mask": [1] * len(row)} for row in rows]


class StepClock(transformers.TrainerCallback):
    """Times each optimizer step (synchronized on a GPU) and counts its tokens, padding excluded
    (`count` is a forward pre-hook for the trained model)."""

    def __init__(self):
        self.durations, self.tokens, self.counted = [], [], 0

    def count(self, module, args, kwargs):
        if module.training:  # a mask's sum stays on the device until the step ends (no sync mid-step)
            mask = kwargs.get("attention_mask")
            self.counted = self.counted + (mask.sum() if mask is not None and mask.dim() == 2
                                           else kwargs["input_ids"].numel())

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.counted = 0
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.durations.append(time.perf_counter() - self.started)
        self.tokens.append(int(self.counted))


def run_ours(base, data, *, checkpointing, steps, micro_batch, precision, cuda, work):
    base.set_attn_implementation(finetune.choose_attention("auto", packing=True, cuda=cuda))
    model = finetune.add_lora(base, quantized=True, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                              lora_dropout=LORA["lora_dropout"], target_modules=LORA["target_modules"])
    args = finetune.build_training_arguments(
        output_dir=work, micro_batch_size=micro_batch, gradient_accumulation_steps=1, num_epochs=1, max_steps=steps,
        learning_rate=1e-4, warmup_steps=0, optim="adamw_torch", precision=precision,
        gradient_checkpointing=checkpointing, reentrant_checkpointing=finetune.checkpoint_reentrant(model),
        group_by_length=False, evaluate=False,
        save_steps=10**9, eval_steps=10**9, logging_steps=10**9, save_total_limit=1, report_to="none", run_name="",
        seed=0, world_size=1, cuda=cuda,
    )
    clock = StepClock()
    trainer = finetune.build_trainer(model=model, args=args, tokenizer=None, train_data=data, val_data=None,
                                     packing=True, callbacks=[clock])
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    trainer.model.register_forward_pre_hook(clock.count, with_kwargs=True)
    return trainer, clock


def run_trl(base, data, *, checkpointing, steps, micro_batch, precision, cuda, work, tokenizer, length):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    base.set_attn_implementation("flash_attention_2" if flash else "sdpa")
    config = SFTConfig(
        output_dir=work, max_steps=steps, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
        learning_rate=1e-4, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True,
        padding_free=flash, max_length=None if flash else length,
        **{finetune.CHECKPOINTING: checkpointing, f"{finetune.CHECKPOINTING}_kwargs": {"use_reentrant": False}},
    )
    clock = StepClock()
    dataset = Dataset.from_dict({"input_ids": [row["input_ids"] for row in data]})
    trainer = SFTTrainer(model=base, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA), callbacks=[clock])
    trainer.model.register_forward_pre_hook(clock.count, with_kwargs=True)
    return trainer, clock


def placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's vocabulary: TRL wants a processing class (for its pad
    token) even for pre-tokenized data."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                                pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:120] if text else ''}".replace("|", "/")


def release(trainer, base):
    """Take the LoRA layers and checkpointing off the shared base and free the row's memory."""
    model = getattr(trainer, "model", None) if trainer is not None else None
    if model is not None and hasattr(model, "unload"):
        model.unload()
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()
    if hasattr(base, "_require_grads_hook"):  # a hook PEFT/TRL may leave on the embeddings
        base.disable_input_require_grads()
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same families, on a CPU or GPU")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--bits", default="8,4", help="base quantization(s): 8, 4")
    parser.add_argument("--trainers", default="finetune.py,TRL",
                        help="finetune.py, TRL, and finetune.py-per-example: finetune.py with one SDPA call per "
                             "example even where varlen attention would run (to measure what varlen gives)")
    parser.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off, on")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per row (the first is not timed)")
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--min_length", type=int, default=None,
                        help="examples of --min_length to --length tokens (seeded) instead of all of --length: "
                             "finetune.py packs them, TRL pads each micro-batch to its longest")
    parser.add_argument("--time_budget_s", type=float, default=330, help="rows not started by then are skipped")
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    options = parser.parse_args(argv)
    unknown = {name.strip() for name in options.trainers.split(",") if name.strip()} - set(TRAINERS)
    if unknown:
        parser.error(f"--trainers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TRAINERS)}")

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if options.tiny:
        options.micro_batch, options.length = min(options.micro_batch, 4), min(options.length, 32)
    if cuda:
        enable_tf32()
    precision = resolve_precision("auto", stage="training", device=device)
    trl_installed = importable("trl")  # trl imports datasets too
    card = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [
        f"Card: {card}; torch {torch.__version__}, transformers {transformers.__version__}; precision {precision}; "
        f"LoRA r={LORA['r']} on q/k/v/o; micro-batch {options.micro_batch} x "
        f"{options.length if options.min_length is None else f'{options.min_length}-{options.length}'} tokens; "
        f"{options.steps} steps a row, the first untimed{' (tiny configs)' if options.tiny else ''}",
        "",
        "| model | base | checkpointing | trainer | peak GPU memory (GiB) | tokens/s | note |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    output = Path(options.output) if options.output else None

    def emit(line):
        print(line, flush=True)
        if output:
            with output.open("a") as file:
                file.write(line + "\n")

    if output:
        output.write_text("")
    for line in lines:
        emit(line)

    split = lambda value: [item.strip() for item in value.split(",") if item.strip()]
    for name in split(options.models):
        config = model_config(name, options.tiny)
        tokenizer = placeholder_tokenizer(config.vocab_size)
        data = token_rows(config.vocab_size, count=options.micro_batch * options.steps, length=options.length,
                          min_length=options.min_length)
        for bits in [int(b) for b in split(options.bits)]:
            base_label = f"{bits}-bit"
            if time.perf_counter() - started > options.time_budget_s:
                emit(f"| {name} | {base_label} | - | - | - | - | not run: time budget ({options.time_budget_s:.0f} s) spent |")
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            build_started = time.perf_counter()
            try:
                base = random_quantized_model(config, bits=bits, dtype=torch_dtype(precision), device=device)
            except Exception as error:  # report it and go on with the next base
                emit(f"| {name} | {base_label} | - | - | - | - | could not build the base: {first_line(error)} |")
                gc.collect()
                continue
            print(f"built {name} {base_label} in {time.perf_counter() - build_started:.0f} s", file=sys.stderr, flush=True)
            for checkpointing in [value == "on" for value in split(options.checkpointing)]:
                for which in split(options.trainers):
                    row = f"| {name} | {base_label} | {'on' if checkpointing else 'off'} | {which} |"
                    if time.perf_counter() - started > options.time_budget_s:
                        emit(f"{row} - | - | not run: time budget ({options.time_budget_s:.0f} s) spent |")
                        continue
                    if which == "TRL" and not trl_installed:
                        emit(f"{row} - | - | not run: trl is not installed |")
                        continue
                    trainer = None
                    try:
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        with tempfile.TemporaryDirectory() as work:
                            common = dict(checkpointing=checkpointing, steps=options.steps, micro_batch=options.micro_batch,
                                          precision=precision, cuda=cuda, work=work)
                            if which == "TRL":
                                trainer, clock = run_trl(base, data, tokenizer=tokenizer, length=options.length, **common)
                            else:
                                trainer, clock = run_ours(base, data, **common)
                            with mock.patch.object(attention, "use_varlen_attention", return_value=False) \
                                    if which == "finetune.py-per-example" else contextlib.nullcontext(), \
                                    contextlib.nullcontext() if which == "TRL" else training_speedups(trainer):
                                trainer.train()  # finetune.py's speed-ups on, as finetune.train puts them
                        first = 1 if len(clock.durations) > 1 else 0
                        tokens_per_second = sum(clock.tokens[first:]) / sum(clock.durations[first:])
                        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"
                        emit(f"{row} {peak} | {tokens_per_second:.0f} | |")
                    except Exception as error:  # one row's failure must not cost the others
                        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error):
                            limit = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0
                            emit(f"{row} > {limit:.0f} | - | out of memory |")
                        else:
                            emit(f"{row} - | - | failed: {first_line(error)} |")
                    finally:
                        release(trainer, base)
                        trainer = None
            del base
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    emit("")
    emit(f"Whole run: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
