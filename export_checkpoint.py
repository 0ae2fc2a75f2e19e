"""Export stage: merge a LoRA adapter into its base model and save it for transformers, llama.cpp,
Ollama or PyTorch, prompted as it was trained.

    python export_checkpoint.py --lora_weights ./lora-codeup --output_dir export_checkpoint/codeup --checkpoint_type hf
    python export_checkpoint.py --lora_weights ./lora-codeup --output_dir export_checkpoint/codeup --checkpoint_type gguf --quantize q4_k_m

The merge works tensor by tensor, reading the base model shard by shard (never in 8-bit): each
adapted weight becomes what PEFT computes (W + scaling * B @ A in float32; DoRA, lora_bias,
module copies, resized embeddings too), then the export dtype; each tensor is streamed into its
shard file. Peak memory stays near one tensor plus the adapter and the libraries. An adapter
tensor of a kind the merge does not know stops it (one line naming the tensor): a merge is exact
or refused. Everything is written into a temp folder beside the target and renamed at the end,
so a crash never leaves a half export that looks whole.

The exports' chat template is the training prompt (utils/prompter.py: chat_template), read from
the adapter's prompt_template.json (--prompt_template to choose another).

  hf         {output_dir}/hf_ckpt/: sharded safetensors, config (no quantization settings), tokenizer
             with the chat template, generation config; loads with AutoModelForCausalLM.
  gguf       {output_dir}/gguf/ggml-model-{f32|f16|bf16}.gguf by llama.cpp's own convert_hf_to_gguf.py
             (any architecture it supports), optionally quantized by llama.cpp (q8_0, q4_k_m, q5_k_m),
             and an Ollama Modelfile.{suffix} beside each GGUF.
  gguf-lora  {output_dir}/gguf-lora/: a GGUF of the base and the adapter as a GGUF LoRA
             (convert_lora_to_gguf.py), for llama-cli --lora / llama-cpp-python's lora_path.
  pytorch    {output_dir}/ckpt/consolidated.00.pth + params.json in Meta's Llama layout.
"""

import utils.logs  # noqa: F401  (first: before tqdm is imported, so that a log file gets no bars)

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.export.adapters import Adapter, base_folder, merged_tensors, plan_embeddings, tensor_shapes, weight_files
from utils.export.gguf import QUANTIZATIONS, write_gguf, write_gguf_lora
from utils.export.meta_layout import write_pytorch
from utils.export.shards import HfFolder, parse_size
from utils.files import replacing
from utils.model_loading import DEFAULT_BASE_MODEL, load_tokenizer
from utils.precision import resolve_precision, torch_dtype
from utils.prompter import chat_template, read_template_record, resolve_prompt_template

CHECKPOINT_FOLDERS = {"hf": "hf_ckpt", "pytorch": "ckpt", "gguf": "gguf", "gguf-lora": "gguf-lora"}


def main(
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    output_dir: str = "export_checkpoint",
    checkpoint_type: str = "hf",
    precision: str = "float16",
    max_shard_size: str = "2GB",
    quantize="",
    prompt_template: str | None = None,
    overwrite: bool = False,
):
    """Merge --lora_weights into --base_model and export it.

    Args:
        base_model: the base the adapter was trained on: hub id, local HF folder, .gguf file, or smollm2-135m.
        lora_weights: the adapter folder from finetune.py (adapter_config.json + adapter_model.safetensors).
        output_dir: where the export goes: {output_dir}/hf_ckpt, /ckpt, /gguf or /gguf-lora.
        checkpoint_type: hf (transformers), pytorch (Meta's Llama layout), gguf (llama.cpp, merged) or
            gguf-lora (llama.cpp: a GGUF of the base plus the adapter as a GGUF LoRA).
        precision: the exported weights' dtype: float16, bfloat16 or float32 (auto: float16; see the
            precision table in docs/hardware.md).
        max_shard_size: the largest safetensors shard of an hf export, e.g. 500MB or 2GB.
        quantize: gguf only: also write quantized files, e.g. q4_k_m or q8_0,q4_k_m,q5_k_m (llama.cpp's
            quantizer, through llama-cpp-python).
        prompt_template: the prompt the export's chat template renders; default: the one the adapter
            was trained with (prompt_template.json in the adapter), else alpaca. Another one warns.
        overwrite: replace an existing export of this type.
    """
    dtype, quantizations = check_flags(checkpoint_type=checkpoint_type, precision=precision, quantize=quantize,
                                       lora_weights=lora_weights)
    max_shard_bytes = parse_size(max_shard_size)
    target = Path(output_dir).expanduser() / CHECKPOINT_FOLDERS[checkpoint_type]
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CodeUpError(f"{target} exists and is not empty: pass --overwrite to replace it")

    adapter = Adapter(Path(lora_weights).expanduser())
    record = read_template_record(lora_weights)
    template = resolve_prompt_template(prompt_template, lora_weights=lora_weights)
    base = base_folder(base_model)
    files = weight_files(base)
    config = AutoConfig.from_pretrained(str(base))
    extra, vocab_rows = plan_merge(adapter, files=files, config=config)
    tokenizer = export_tokenizer(base, adapter=adapter, vocab_rows=vocab_rows, template=template)
    hf = HfFolder(base=base, config=config, dtype_name=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
    merged = merged_tensors(files, adapter=adapter, dtype=getattr(torch, dtype), extra=extra)

    with replacing(target, folder=True) as staging:
        if checkpoint_type == "hf":
            hf.write(merged, folder=staging)
        elif checkpoint_type == "pytorch":
            write_pytorch(merged, folder=staging, config=config)
        elif checkpoint_type == "gguf":
            write_gguf(merged, folder=staging, hf=hf, template=template, quantizations=quantizations)
        else:
            base_tensors = merged_tensors(files, adapter=Adapter.empty(), dtype=getattr(torch, dtype))
            write_gguf_lora(adapter, base_tensors=base_tensors, folder=staging, hf=hf, template=template,
                            untied=bool(extra))
    prompt = "the base's own chat template" if template is None else (
        f"the {record['name']!r} training prompt" if record and prompt_template is None else "the prompt template given")
    print(f"Exported {base_model} + {lora_weights} ({checkpoint_type}, {dtype}) to {target}; chat template: {prompt}")


def check_flags(*, checkpoint_type: str, precision: str, quantize, lora_weights: str) -> tuple[str, list[str]]:
    """(the export's dtype name, the quantizations asked for), or the error a wrong flag gets."""
    if checkpoint_type not in CHECKPOINT_FOLDERS:
        raise CodeUpError(f"--checkpoint_type must be hf, pytorch, gguf or gguf-lora, not {checkpoint_type!r}")
    # utils/precision.py decides (auto = float16 for exports); any spelling of a precision works
    dtype = str(torch_dtype(resolve_precision(precision, stage="export", device="cpu"))).removeprefix("torch.")
    quantizations = parse_list(quantize) if quantize else []
    if quantizations and (checkpoint_type != "gguf" or set(quantizations) - set(QUANTIZATIONS)):
        raise CodeUpError(f"--quantize takes {', '.join(QUANTIZATIONS)} (comma-separated), with --checkpoint_type gguf")
    if not lora_weights:
        raise CodeUpError("give the adapter to merge: --lora_weights DIR")
    return dtype, quantizations


def plan_merge(adapter: Adapter, *, files: list, config) -> tuple[dict, int | None]:
    """(the extra tensors to write, the adapter's vocabulary size or None): the adapter checked
    against the base's shapes, tied embeddings untied where the adapter changes one side only, and
    `config` updated to match (tying, a resized vocabulary)."""
    shapes = tensor_shapes(files)
    extra = plan_embeddings(adapter, shapes=shapes, config=config, files=files)
    vocab_rows = set(adapter.check_fits(shapes).values())
    vocab_rows = vocab_rows.pop() if vocab_rows else None
    if vocab_rows is not None:
        config.vocab_size = vocab_rows
        if getattr(config, "text_config", None) is not None:
            config.text_config.vocab_size = vocab_rows
    return extra, vocab_rows


def export_tokenizer(base: Path, *, adapter: Adapter, vocab_rows: int | None, template: dict | None):
    """The tokenizer the adapter was trained with, its chat template the training prompt.

    Its tokens: the adapter folder's own tokenizer when it has one (tokens added in training), else
    the base's, plus the pad token finetune.py adds when the base has none, if the adapter's
    resized embeddings say training had it."""
    if (adapter.folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter.folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        if vocab_rows is not None and vocab_rows > len(tokenizer):
            tokenizer = load_tokenizer(str(base))  # finetune.py's tokenizer: a pad token added
    if vocab_rows is not None and len(tokenizer) > vocab_rows:
        raise CodeUpError(f"the adapter's embeddings have {vocab_rows} rows but its tokenizer has {len(tokenizer)} "
                          "tokens: save the training tokenizer into the adapter folder")
    if template is not None:  # None: a chat-tuned adapter keeps the base's own chat template
        tokenizer.chat_template = chat_template(template)
    return tokenizer


if __name__ == "__main__":
    run_cli(main, aliases={"export_dir": "output_dir", "dtype": "precision"})
