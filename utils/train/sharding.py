"""Sharded LoRA training (FSDP) through accelerate: what a run can shard, the sharding itself, and the
adapter gathered back into PEFT's files.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml finetune.py ...` shards inside the
Trainer: Accelerator.prepare runs accelerate's fsdp2_prepare_model (torch's fully_shard on each
decoder layer, then on the root), and the Trainer's checkpoints are accelerate's sharded
torch.distributed.checkpoint folders. This module adds what the Trainer does not do for a LoRA run:

- fsdp_plan: before any model loads, what the launch configuration will do with this base (shard it,
  on GPUs or, with FSDP2, on CPUs too; fall back to DDP where FSDP1 cannot run; or fail: 4-bit under
  FSDP2, 8-bit under any FSDP), in one line;
- launch_precision: the precision the launch configuration asks for (its mixed_precision), checked
  against finetune.py's --precision;
- use_fsdp_state: accelerate's state switched to FSDP where accelerate left it DDP (CPUs), so that
  the Trainer's own FSDP code runs there;
- save_gathered_adapter / gathered_adapter_state_dict: the adapter gathered from the shards and
  written as PEFT writes it (the Trainer writes no adapter with SHARDED_STATE_DICT, and with
  FULL_STATE_DICT it gathers the whole base into rank 0's memory first);
- GatheredAdapterCheckpoints: the same adapter written into each checkpoint, so that a checkpoint
  stays an adapter (generate.py, evaluate.py, export_checkpoint.py read it) as in an unsharded run;
- shard_lora_model: accelerate's own FSDP preparation run where accelerate would not run it (a CPU
  process group on gloo), so that the tests check the very code a GPU run goes through.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

# The device types whose multi-process runs accelerate turns into FSDP when asked (its state.py: the
# MULTI_GPU, MULTI_XPU, MULTI_NPU, ... branch). On any other device (a CPU) an FSDP configuration
# silently trains DDP.
FSDP_DEVICE_TYPES = ("cuda", "xpu", "npu", "mlu", "musa", "sdaa", "hpu", "neuron")

FSDP2_CONFIG = "configs/accelerate/fsdp2.yaml"
QLORA_CONFIG = "configs/accelerate/fsdp_qlora.yaml"
DDP_CONFIG = "configs/accelerate/ddp.yaml"


@dataclass(frozen=True)
class FsdpPlan:
    """What the launch configuration does with this run's base model.

    sharded: the base weights are split over the processes (load the model without a device_map:
        accelerate places the shards; with cpu_ram_efficient_loading it broadcasts rank 0's weights).
    fsdp_version: 1 or 2 when FSDP was asked for, else None.
    error: the configuration cannot train this base; `line` says what to use instead.
    quant_storage_as_compute_dtype: a 4-bit base must store its packed weights in the compute dtype
        (BitsAndBytesConfig(bnb_4bit_quant_storage=dtype), loaded with dtype=that same dtype): FSDP
        shards floating-point tensors only.
    line: one line to print (or raise, with error), empty when FSDP was not asked for.
    switch_state: accelerate itself would train DDP on this device (a CPU): the Trainer's accelerator
        must be switched to FSDP (use_fsdp_state) for the run to shard.
    ddp_instead: the run trains DDP although FSDP was asked for (said in `line`): accelerate must not
        see the FSDP configuration (its FSDP1 plugin refuses a CPU), so ACCELERATE_USE_FSDP is turned off.
    """

    sharded: bool
    fsdp_version: int | None
    error: bool
    quant_storage_as_compute_dtype: bool
    line: str
    switch_state: bool = False
    ddp_instead: bool = False


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP configuration (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plan(*, device_type: str, load_in_8bit: bool, load_in_4bit: bool, use_fsdp: bool | None = None,
              fsdp_version: int | None = None, num_processes: int | None = None) -> FsdpPlan:
    """What an FSDP launch configuration will do with this base, decided before the model loads.

    use_fsdp, fsdp_version and num_processes default to what `accelerate launch` put in the
    environment (ACCELERATE_USE_FSDP, FSDP_VERSION, WORLD_SIZE); device_type is this process's
    device ("cuda", "cpu", ...). Why each case:
    - a CPU: accelerate's state switches to FSDP for GPU-like devices only, and would silently train
      DDP. With FSDP2 the run shards anyway: torch's fully_shard runs on CPUs over gloo, and the
      Trainer's accelerator is switched to FSDP (switch_state; tests/test_fsdp.py shows the result
      equal to one process's). FSDP1's plugin refuses a CPU (sync_module_states, which
      cpu_ram_efficient_loading needs): that run trains DDP, every process holding the whole model.
      Said, not refused. Any other device accelerate does not shard on: DDP, said.
    - 8-bit (LLM.int8) under FSDP: its int8 weights (their scales kept beside them, with no
      floating-point storage option as 4-bit has) are not tensors FSDP can shard.
    - 4-bit under FSDP2: upstream FSDP2 does not train a bitsandbytes 4-bit base (with the default
      uint8 storage accelerate leaves those weights out of the sharding, whole on every GPU); FSDP1
      with bnb_4bit_quant_storage = compute dtype is what PEFT, TRL and LLaMA-Factory ship for QLoRA.
    """
    environ = os.environ
    if use_fsdp is None:
        use_fsdp = fsdp_requested()
    if not use_fsdp:
        return FsdpPlan(sharded=False, fsdp_version=None, error=False, quant_storage_as_compute_dtype=False, line="")
    if fsdp_version is None:
        fsdp_version = int(environ.get("FSDP_VERSION", "1"))  # accelerate's default when the config names none
    if num_processes is None:
        num_processes = int(environ.get("WORLD_SIZE", "1"))
    name = f"FSDP{fsdp_version}"

    def plan(line, *, sharded=True, error=False, quant_storage=False, switch_state=False, ddp_instead=False):
        return FsdpPlan(sharded=sharded, fsdp_version=fsdp_version, error=error,
                        quant_storage_as_compute_dtype=quant_storage, line=line, switch_state=switch_state,
                        ddp_instead=ddp_instead)

    on_cpu = device_type == "cpu"
    if on_cpu and fsdp_version == 2 and num_processes < 2:
        return plan(f"an {name} configuration with one process on a CPU: nothing to shard, so this run trains "
                    "one unsharded process", sharded=False, ddp_instead=True)
    if device_type not in FSDP_DEVICE_TYPES and not (on_cpu and fsdp_version == 2):
        return plan(f"an {name} configuration on a {device_type.upper()}: accelerate cannot shard there, so this "
                    "run trains DDP instead (every process holds the whole model)"
                    + (f"; {FSDP2_CONFIG} shards on CPUs too" if on_cpu else ""),
                    sharded=False, ddp_instead=True)
    if load_in_8bit:
        return plan(f"an 8-bit base cannot be sharded with {name} (LLM.int8 weights are not tensors FSDP "
                    f"can shard): train it with {DDP_CONFIG}, shard a 4-bit base with "
                    f"{QLORA_CONFIG} (--load_in_4bit), or a bf16 one with {FSDP2_CONFIG} (--load_in_8bit False)",
                    sharded=False, error=True)
    if load_in_4bit and fsdp_version == 2:
        return plan(f"a 4-bit base cannot be sharded with FSDP2 (upstream FSDP2 does not train bitsandbytes' "
                    f"4-bit weights): use {QLORA_CONFIG} (FSDP1, the 4-bit weights stored as bf16), or "
                    f"{FSDP2_CONFIG} with a bf16 base (no --load_in_4bit)", sharded=False, error=True)
    share = f"each of the {num_processes} processes holds 1/{num_processes}" if num_processes > 1 else \
        "one process holds all"
    if load_in_4bit:
        return plan(f"FSDP1 QLoRA: the 4-bit weights are stored in the compute dtype so that FSDP shards them; "
                    f"{share} of the frozen base; the adapter is gathered at the end", quant_storage=True)
    if on_cpu:
        return plan(f"FSDP2 on CPUs (gloo; accelerate alone would train DDP here, finetune.py shards as on GPUs): "
                    f"{share} of the frozen base weights (one shard group per decoder layer); the adapter is "
                    "gathered at the end", switch_state=True)
    return plan(f"{name}: {share} of the frozen base weights (one shard group per decoder layer); "
                "the adapter is gathered at the end")


def launch_precision() -> str | None:
    """bf16 or fp16 when the launch configuration asks for that mixed precision (`accelerate launch`
    puts the config's mixed_precision in ACCELERATE_MIXED_PRECISION, and the Trainer takes it from
    there unless told bf16 or fp16), else None ("no", or not launched by accelerate)."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return value if value in ("bf16", "fp16") else None


def fsdp_activation_checkpointing() -> bool:
    """Whether the launch configuration turns on FSDP's own activation checkpointing
    (fsdp_activation_checkpointing), which finetune.py refuses: its --gradient_checkpointing is the one
    mechanism (the Trainer refuses both at once)."""
    return (fsdp_requested()
            and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true")


def use_fsdp_state(accelerator, fsdp_plugin=None) -> None:
    """Switches accelerator's state to FSDP where accelerate left it DDP (MULTI_CPU on CPUs), as
    accelerate's own state does on GPUs: the FSDP plugin (default: the one the launch configuration
    describes in the environment) and the accelerator's mixed precision set on it. After this,
    Accelerator.prepare shards the model, and a transformers Trainer whose accelerator this is (its
    is_fsdp_enabled set too) saves and resumes sharded checkpoints."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        return
    fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    if accelerator.mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)  # as accelerate's state does for FSDP
    state.fsdp_plugin = fsdp_plugin


# ---- the adapter, gathered from the shards -------------------------------------------------

def _gathered_trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The full trainable (LoRA) tensors on rank 0's CPU, under the model's own parameter names; {}
    on the other ranks. Collective: every rank calls it. Frozen weights are never gathered, so rank 0
    holds the adapter alone, not the base (what FULL_STATE_DICT would gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def gathered_adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole adapter of a sharded PeftModel on rank 0, named as PEFT's get_peft_model_state_dict
    names it (the keys of adapter_model.safetensors); {} on the other ranks. Every rank must call it."""
    from peft import get_peft_model_state_dict

    state_dict = _gathered_trainable_state_dict(model)
    if not state_dict:
        return {}
    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=model.active_adapter)


def save_gathered_adapter(model, output_dir, *, is_main_process: bool | None = None) -> None:
    """Writes the adapter of a sharded PeftModel into output_dir as an unsharded run does
    (adapter_model.safetensors + adapter_config.json, through PeftModel.save_pretrained), from rank 0.
    Every rank must call it (the gathering is collective)."""
    state_dict = _gathered_trainable_state_dict(model)
    if is_main_process is None:
        is_main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if is_main_process:
        model.save_pretrained(output_dir, state_dict=state_dict)


class GatheredAdapterCheckpoints(transformers.TrainerCallback):
    """Writes the gathered adapter into each checkpoint of a sharded run. The Trainer's sharded
    checkpoints hold torch.distributed.checkpoint folders (what resuming reads) but no
    adapter_model.safetensors; with this a checkpoint is an adapter as in an unsharded run. Insert it
    before MarkCompleteCheckpoints, whose marker must come last."""

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_gathered_adapter(model, folder, is_main_process=state.is_world_process_zero)


# ---- accelerate's FSDP preparation where accelerate would not run it ------------------------

def shard_lora_model(model, optimizer=None, *, fsdp_plugin=None, mixed_precision: str = "no"):
    """(accelerator, model, optimizer): model and optimizer prepared by accelerate's FSDP code, the
    code a GPU run of `accelerate launch --config_file configs/accelerate/fsdp2.yaml finetune.py`
    goes through (Accelerator.prepare: for FSDP2, fsdp2_prepare_model shards each
    TRANSFORMER_BASED_WRAP layer, the embeddings, the head and the root, broadcasts rank 0's weights
    with cpu_ram_efficient_loading, upcasts trainable parameters to fp32 under mixed precision, and
    points the optimizer at the sharded parameters).

    Why this exists: accelerate switches its state to FSDP only on GPU-like devices, so on a CPU an
    FSDP configuration trains DDP and nothing of the above runs. Here the state is switched to FSDP
    by hand when accelerate did not (use_fsdp_state), so that the same preparation runs over any
    process group (gloo on CPUs: the tests). finetune.py does not call this: its Trainer prepares the
    model itself (on CPUs after the same use_fsdp_state). fsdp_plugin: accelerate's
    FullyShardedDataParallelPlugin; default: the one `accelerate launch --config_file ...` describes
    in the environment.
    """
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()
    # cpu=True without an accelerator device, as the Trainer's use_cpu: the processes then are
    # accelerate's MULTI_CPU group (ranks, main process), which only the FSDP switch below changes
    cpu = torch.accelerator.current_accelerator() is None
    accelerator = Accelerator(fsdp_plugin=fsdp_plugin, mixed_precision=mixed_precision, cpu=cpu)
    use_fsdp_state(accelerator, fsdp_plugin)  # finetune.py's Trainer does the same on CPUs
    if optimizer is None:
        return accelerator, accelerator.prepare(model), None
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer
