"""One process of a sharded LoRA run on CPUs (gloo), for tests/test_fsdp.py. Started by
`accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no
tests/fsdp_worker.py ...`, so the FSDP settings reach it as they reach finetune.py: from the config,
through the environment accelerate launch sets.

It builds the LoRA model as finetune.py does (finetune.build_lora_model; each rank initializes LoRA
from its own seed), shards it with utils/train/sharding.shard_lora_model (accelerate's FSDP2
preparation), trains STEPS optimizer steps on fixed data (each rank half of every global batch; the
loss as finetune.py's Trainer computes it), and writes what the test compares to one
process's run into --out/result.pt (rank 0): the global loss and the full LoRA gradients of each
step, each rank's share of the frozen weights, the gathered adapter; the adapter in PEFT's files in
--out/adapter. --save_after K writes the Trainer's sharded checkpoint (accelerate's save_fsdp_model /
save_fsdp_optimizer, as transformers' Trainer calls them) after step K; --resume loads one (as the
Trainer resumes) and runs the steps after it.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

BATCH, LENGTH, SEED = 4, 16, 7
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
LEARNING_RATE = 1e-2


def batch_of_step(step: int, vocab_size: int) -> torch.Tensor:
    """The global batch of optimizer step `step` (1-based), the same in every process and run: rows of
    equal length and no padding, so that each rank's mean loss weighs its tokens as the global mean does."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, vocab_size, (BATCH, LENGTH), generator=generator)


def build_model(model_dir: str, *, seed: int = SEED, dtype=torch.float32):
    """finetune.py's LoRA model (no dropout), its LoRA initialized from `seed`."""
    import transformers

    import finetune

    transformers.set_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return finetune.build_lora_model(base_model=model_dir, tokenizer=tokenizer, load_in_8bit=False,
                                     load_in_4bit=False, dtype=dtype, **LORA)


def loss_of(model, rows, *, chunked: bool):
    """The mean next-token loss of rows: as finetune.py's Trainer computes it by default (the model's
    forward with its head bypassed, then utils/train/loss.py's chunked loss on the head's weight:
    under FSDP2 the head is one of the sharded modules), or the model's own."""
    if not chunked:
        return model(input_ids=rows, labels=rows).loss
    from utils.train.loss import head_of, head_skipped, linear_cross_entropy

    head = head_of(model)
    with head_skipped(head):
        hidden_states = model(input_ids=rows).logits
    return linear_cross_entropy(hidden_states, head.weight, rows)


def optimizer_of(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)


def canonical(name: str) -> str:
    return name.replace("._checkpoint_wrapped_module", "")


def full(tensor):
    """The whole tensor from a sharded one (collective), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def frozen_shares(model) -> dict:
    """This rank's share of the frozen weights: elements and bytes it holds locally, against the
    whole (a DTensor's to_local() is what the process actually stores)."""
    local = total = local_bytes = total_bytes = 0
    unsharded = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            continue
        held = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        if not hasattr(parameter, "to_local"):
            unsharded.append(name)
        local += held.numel()
        local_bytes += held.numel() * held.element_size()
        total += parameter.numel()
        total_bytes += parameter.numel() * parameter.element_size()
    return dict(local=local, total=total, local_bytes=local_bytes, total_bytes=total_bytes, unsharded=unsharded)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save_after", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--loss", default="chunked", choices=["chunked", "model"],
                        help="chunked: finetune.py's Trainer.compute_loss (the head applied outside the model, "
                             "utils/train/loss.py); model: the model's own loss")
    parser.add_argument("--dtype", default="float32", help="the base's dtype (bfloat16 with --mixed_precision bf16)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.fsdp import FSDPModule

    from utils.train.sharding import (GatheredAdapterCheckpoints, gathered_adapter_state_dict, save_gathered_adapter,
                                      shard_lora_model)

    # Accelerator() in shard_lora_model would start the process group; the model loads after it, as
    # in the Trainer (transformers' rank-0-only loading needs the group).
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Each rank initializes LoRA differently: cpu_ram_efficient_loading must give every rank rank 0's.
    model = build_model(args.model, seed=SEED + rank, dtype=getattr(torch, args.dtype))
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    accelerator, model, optimizer = shard_lora_model(model, optimizer_of(model))
    plugin = accelerator.state.fsdp_plugin
    vocab_size = model.get_input_embeddings().weight.shape[0]

    first_step = 1
    if args.resume:
        # transformers' Trainer._load_from_checkpoint and _load_optimizer_and_scheduler under FSDP
        load_fsdp_model(plugin, accelerator, model, args.resume, adapter_only=True)
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, args.resume, adapter_only=True)
        first_step = int(Path(args.resume).name.split("-")[-1]) + 1

    layers = model.get_base_model().model.layers
    result = dict(world_size=world_size, losses={}, gradients={}, shares=None,
                  fsdp_version=plugin.fsdp_version, model_class=type(model).__name__,
                  layers_sharded=all(isinstance(layer, FSDPModule) for layer in layers),
                  root_sharded=isinstance(model, FSDPModule),
                  # what accelerate made of the FSDP configuration on its own (before shard_lora_model's switch)
                  accelerate_distributed_type=str(PartialState().distributed_type),
                  dtypes={name: str(parameter.dtype) for name, parameter in model.named_parameters()})
    shares = [None] * world_size
    dist.all_gather_object(shares, frozen_shares(model))
    result["shares"] = shares

    model.train()
    for step in range(first_step, args.steps + 1):
        rows = batch_of_step(step, vocab_size).chunk(world_size)[rank]
        loss = loss_of(model, rows, chunked=args.loss == "chunked")
        loss.backward()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        result["losses"][step] = global_loss.item() / world_size
        gradients = {canonical(name): full(parameter.grad).clone() for name, parameter in model.named_parameters()
                     if parameter.requires_grad}
        result["gradients"][step] = gradients
        optimizer.step()
        optimizer.zero_grad()
        if step == args.save_after:
            folder = Path(args.out) / f"checkpoint-{step}"
            # transformers' Trainer._save_optimizer_and_scheduler under FSDP (get_fsdp_ckpt_kwargs: adapter_only)
            save_fsdp_model(plugin, accelerator, model, folder, adapter_only=True)
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, folder)
            GatheredAdapterCheckpoints().on_save(SimpleNamespace(output_dir=args.out), SimpleNamespace(
                global_step=step, is_world_process_zero=rank == 0), None, model=model)

    adapter = gathered_adapter_state_dict(model)
    save_gathered_adapter(model, Path(args.out) / "adapter")
    if rank == 0:
        result.update(adapter=adapter, trainable_names=names)
        torch.save(result, Path(args.out) / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
