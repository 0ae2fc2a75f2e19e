"""finetune.py's training speed-ups, put on and taken off in one place, behind one switch.

Each computes what transformers and PEFT compute (the same bits, or gradients within bf16
rounding: each module's tests compare) in less time or memory. Some matter on any device:
- per-example attention (utils/train/attention.py): packed rows without a mask over the whole row; it is
  chosen when the model loads (finetune.choose_attention), so it is reported here, not installed;
- the chunked loss (utils/train/loss.py, finetune.Trainer): no full logits.
The rest are CPU kernels, put on only where they apply (each falls back to the original off a
CPU, or for a dtype it does not handle):
- LoRA dropout from 15-bit draws, LoRA inputs without a float32 copy (utils/train/speedups/dropout.py);
- RMSNorm and rotary embeddings with hand-written backwards (utils/train/speedups/rms_norm.py, utils/train/speedups/rotary.py),
  only where transformers' Llama code is the code they were tested against (utils/train/speedups/source_code.py);
- frozen bf16 weights packed once for oneDNN (utils/train/speedups/packed_weights.py).

`training_speedups(trainer, enabled=...)` puts them all on for the length of a `with` block and
takes them all off after it, even after an error, and prints one line: what is on (and how many
modules each changed), what is off and why. `finetune.py --cpu_speedups False` turns all of them
off: transformers' and PEFT's own code throughout.
"""

import contextlib
import warnings

from utils.train.attention import PER_EXAMPLE_SDPA, per_example_limits
from utils.train.speedups.dropout import (restore_lora_dropout, restore_lora_input_copies, skip_lora_input_copies,
                           use_fast_lora_dropout)
from utils.logs import logger
from utils.train.loss import head_of
from utils.train.speedups.packed_weights import packable_linears, packed_frozen_linears
from utils.train.speedups.rms_norm import restore_rms_norm, untested_rms_norm, use_fast_rms_norm
from utils.train.speedups.rotary import fast_rotary_embeddings, untested_rotary


def attention_entry(model, *, enabled: bool, cutoff_len: int) -> tuple:
    """(name, on, why off) for per-example attention, chosen when the model loaded."""
    implementation = model.config._attn_implementation
    if implementation == PER_EXAMPLE_SDPA:
        return "per-example attention", True, None
    if not enabled:
        return "per-example attention", False, "--cpu_speedups False"
    limit = per_example_limits(model.config, cutoff_len=cutoff_len)
    return "per-example attention", False, f"transformers' {implementation}" + (f": {limit[1]}" if limit else "")


@contextlib.contextmanager
def training_speedups(trainer, *, enabled: bool = True, cutoff_len: int = 512, sharded: bool = False):
    """Inside the block, trainer's model trains with every speed-up that applies (module
    docstring); after it, with none. Yields {name: modules changed, or None} for those that are on.
    sharded: the base is sharded by FSDP (utils/train/sharding.py): per-example attention and the
    chunked loss apply (on CPUs the sharded run's losses and adapter equal one process's:
    tests/test_finetune.py); the CPU kernels step aside, as they read (or pack once) whole frozen
    weights, which FSDP holds in shards."""
    model = trainer.model
    on_cpu = next(model.parameters()).device.type == "cpu"
    entries = [attention_entry(model, enabled=enabled, cutoff_len=cutoff_len)]  # (name, on, count if on else why)
    with contextlib.ExitStack() as undo:
        undo.callback(setattr, trainer, "chunked_loss", trainer.chunked_loss)
        head = head_of(model)
        trainer.chunked_loss = enabled and head is not None
        entries.append(("chunked loss", trainer.chunked_loss, None if trainer.chunked_loss else
                        "--cpu_speedups False" if not enabled else "this model's head is more than a matmul"))
        if sharded and trainer.chunked_loss:
            # The chunked loss skips the head (its FSDP unit then returns its input, a view) and applies
            # the head's gathered weight itself: FSDP2 warns at each step that an in-place op on such a
            # view would skip a gather; the loss makes none (the test: the same gradients as one process).
            undo.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
        if enabled and on_cpu and not sharded:
            count = use_fast_lora_dropout(model)
            undo.callback(restore_lora_dropout, model)
            entries.append(("LoRA dropout", count > 0, count or "no dropout"))
            count = skip_lora_input_copies(model)
            undo.callback(restore_lora_input_copies, model)
            entries.append(("LoRA input copies", count > 0, count or "no plain LoRA layer"))
            why_not = untested_rms_norm()
            count = 0 if why_not else use_fast_rms_norm(model)
            undo.callback(restore_rms_norm, model)
            entries.append(("RMSNorm", count > 0, count or why_not or "no frozen Llama-family norm"))
            why_not = untested_rotary()
            count = undo.enter_context(fast_rotary_embeddings(model))
            entries.append(("rotary embeddings", count > 0, count or why_not or "no Llama-family rotary"))
            packable = packable_linears(model)
            count = undo.enter_context(packed_frozen_linears(model, head=head if trainer.chunked_loss else None))
            entries.append(("packed weights", count > 0, count or ("not enough memory" if packable else
                                                                   "no frozen bf16 linear on a CPU with native bf16")))
        else:
            entries.append(("CPU kernels", False, "--cpu_speedups False" if not enabled else
                            "not on a CPU" if not on_cpu else "the base is sharded by FSDP"))
        on = [f"{name} ({detail})" if detail else name for name, is_on, detail in entries if is_on]
        off = [f"{name} ({detail})" for name, is_on, detail in entries if not is_on]
        logger.info(f"speed-ups: on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}")
        yield {name: detail for name, is_on, detail in entries if is_on}
