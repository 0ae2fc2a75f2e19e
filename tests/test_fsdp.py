"""Sharded LoRA training (issue 29): accelerate's FSDP2 preparation of finetune.py's LoRA model, run on
CPUs with gloo by 2 processes (tests/fsdp_worker.py, started by `accelerate launch --config_file
configs/accelerate/fsdp2.yaml`), against one process on the same data in fp32: the same losses and LoRA
gradients, half the frozen weights per process, the same adapter gathered into PEFT's files, and a
resumed sharded run equal to an uninterrupted one. Also: the accelerate configs parse as accelerate
launch reads them, and utils/train/sharding.fsdp_plan's line for each case."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port

import fsdp_worker as worker
from utils.train.sharding import FSDP_DEVICE_TYPES, fsdp_plan

CONFIGS = ROOT / "configs" / "accelerate"
STEPS = 3
TIGHT = dict(atol=1e-6, rtol=1e-6)  # fp32: the sharded sums differ from one process's by rounding alone


def launch(*worker_args, mixed_precision="no"):
    """tests/fsdp_worker.py on 2 CPU processes, launched as a user launches finetune.py."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               *(["--mixed_precision", mixed_precision] if mixed_precision else []),
               str(ROOT / "tests" / "fsdp_worker.py"), *map(str, worker_args)]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]


def result_of(folder):
    return torch.load(folder / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def sharded(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted sharded run of 3 steps (a checkpoint after step 1), and a run resumed from that
    checkpoint in fresh processes."""
    uninterrupted, resumed = tmp_path_factory.mktemp("fsdp-run"), tmp_path_factory.mktemp("fsdp-resumed")
    launch("--model", tiny_llama_dir, "--out", uninterrupted, "--steps", STEPS, "--save_after", 1)
    launch("--model", tiny_llama_dir, "--out", resumed, "--steps", STEPS,
           "--resume", uninterrupted / "checkpoint-1")
    return SimpleNamespace(folder=uninterrupted, result=result_of(uninterrupted),
                           resumed_folder=resumed, resumed=result_of(resumed))


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir):
    """The same training in this process, unsharded, on each step's whole batch (rank 0's LoRA
    initialization; finetune.py's chunked loss, as the sharded runs); and, to show that resuming
    needs the optimizer's state, steps 2-3 again from step 1's weights with a fresh optimizer."""
    from peft import get_peft_model_state_dict

    torch.set_num_threads(1)
    model = worker.build_model(str(tiny_llama_dir))
    optimizer = worker.optimizer_of(model)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    batches = {step: worker.batch_of_step(step, vocab_size) for step in range(1, STEPS + 1)}
    with torch.no_grad():
        untrained_loss_2 = model(input_ids=batches[2], labels=batches[2]).loss.item()

    def train(model, optimizer, steps, record=None):
        for step in steps:
            loss = worker.loss_of(model, batches[step], chunked=True)
            loss.backward()
            if record is not None:
                record["losses"][step] = loss.item()
                record["gradients"][step] = {name: parameter.grad.clone()
                                             for name, parameter in model.named_parameters() if parameter.requires_grad}
            optimizer.step()
            optimizer.zero_grad()
            if record is not None:
                record["adapters"][step] = {key: value.clone()
                                            for key, value in get_peft_model_state_dict(model).items()}

    record = dict(losses={}, gradients={}, adapters={})
    train(model, optimizer, [1], record)
    restarted = copy.deepcopy(model)
    train(model, optimizer, range(2, STEPS + 1), record)
    train(restarted, worker.optimizer_of(restarted), range(2, STEPS + 1))
    return SimpleNamespace(model=model, batches=batches, untrained_loss_2=untrained_loss_2,
                           fresh_optimizer_adapter=get_peft_model_state_dict(restarted), **record)


def assert_same_tensors(actual: dict, expected: dict, **tolerance):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **(tolerance or TIGHT), msg=lambda m: f"{key}: {m}")


# ---- sharded training equals one process's ---------------------------------------------

def test_fsdp2_loss_and_lora_gradients_equal_one_process(sharded, one_process):
    result = sharded.result
    assert result["world_size"] == 2 and result["fsdp_version"] == 2
    assert result["model_class"].startswith("FSDP")  # fully_shard ran on the PeftModel itself (the root)
    # The ranks initialized LoRA each from its own seed: equality also shows that every rank trains
    # rank 0's weights (cpu_ram_efficient_loading's broadcast).
    for step in range(1, STEPS + 1):
        torch.testing.assert_close(result["losses"][step], one_process.losses[step], **TIGHT)
        assert_same_tensors(result["gradients"][step], one_process.gradients[step])
    # not trivially equal: LoRA B starts at zero, but by step 3 every LoRA weight has a gradient
    assert all(gradient.abs().max() > 1e-4 for gradient in one_process.gradients[STEPS].values())


def test_fsdp2_each_rank_holds_half_the_frozen_weights(sharded):
    result = sharded.result
    assert result["layers_sharded"] and result["root_sharded"]  # TRANSFORMER_BASED_WRAP: one group per decoder layer
    shares = result["shares"]
    assert sum(share["local"] for share in shares) == shares[0]["total"]
    for share in shares:
        assert share["unsharded"] == []  # every frozen weight is a DTensor shard, embeddings and head included
        assert 0.45 <= share["local"] / share["total"] <= 0.55
        assert 0.45 <= share["local_bytes"] / share["total_bytes"] <= 0.55


def test_fsdp2_gathered_adapter_equals_one_process_and_loads_with_peft(sharded, one_process, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    expected = one_process.adapters[STEPS]
    assert_same_tensors(sharded.result["adapter"], expected)
    adapter_dir = sharded.folder / "adapter"
    assert_same_tensors(load_file(str(adapter_dir / "adapter_model.safetensors")), expected)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == worker.LORA["lora_r"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # each checkpoint is an adapter too (GatheredAdapterCheckpoints), beside the sharded state
    assert_same_tensors(load_file(str(sharded.folder / "checkpoint-1" / "adapter_model.safetensors")),
                        one_process.adapters[1])

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    one_process.model.eval()
    batch = one_process.batches[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, one_process.model(input_ids=batch).logits,
                                   atol=1e-5, rtol=1e-5)


def test_fsdp2_resumed_run_equals_uninterrupted(sharded, one_process):
    resumed, uninterrupted = sharded.resumed, sharded.result
    assert sorted(resumed["losses"]) == [2, 3]
    for step in (2, 3):
        torch.testing.assert_close(resumed["losses"][step], uninterrupted["losses"][step], **TIGHT)
        assert_same_tensors(resumed["gradients"][step], uninterrupted["gradients"][step])
    assert_same_tensors(resumed["adapter"], uninterrupted["adapter"])
    # what makes this a test of the checkpoint: without step 1's weights, or without the optimizer's
    # state, steps 2-3 come out otherwise
    assert abs(one_process.untrained_loss_2 - uninterrupted["losses"][2]) > 1e-4
    assert max((one_process.fresh_optimizer_adapter[key] - one_process.adapters[STEPS][key]).abs().max()
               for key in one_process.adapters[STEPS]) > 1e-4


def test_fsdp_configuration_on_a_cpu_is_ddp_to_accelerate(sharded):
    # accelerate made the FSDP configuration MULTI_CPU (DDP) on its own; shard_lora_model switched it
    # (use_fsdp_state), as finetune.py's Trainer does where fsdp_plan says switch_state
    assert sharded.result["accelerate_distributed_type"] == "DistributedType.MULTI_CPU"
    plan = fsdp_plan(device_type="cpu", load_in_8bit=False, load_in_4bit=False, use_fsdp=True, fsdp_version=2,
                     num_processes=2)
    assert plan.sharded and plan.switch_state and not plan.error and not plan.ddp_instead


# ---- the configs, as accelerate launch reads them ----------------------------------------

def launch_settings(config_file, monkeypatch):
    """What `accelerate launch --config_file CONFIG_FILE finetune.py` gives the processes: its
    parsed config, its environment, and the FSDP plugin the Accelerator builds from that environment
    on a GPU (the device mocked: FSDP1's plugin refuses sync_module_states on a CPU)."""
    import accelerate.utils.dataclasses
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = load_config_from_file(str(config_file))
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--main_process_port", "0",
                                               "finetune.py"])
    args, _, _ = _validate_launch_command(args)
    env = {key: value for key, value in prepare_multi_gpu_env(args).items()
           if key.startswith(("ACCELERATE_", "FSDP_"))}
    plugin = None
    if env.get("ACCELERATE_USE_FSDP") == "true":
        monkeypatch.setattr(accelerate.utils.dataclasses, "get_torch_accelerator_backend",
                            lambda *args, **kwargs: ("cuda", None))
        with patch_environment(**env):
            plugin = FullyShardedDataParallelPlugin()
    return config, env, plugin


@pytest.mark.parametrize("name", ["fsdp2.yaml", "fsdp_qlora.yaml", "ddp.yaml"])
def test_fsdp_and_ddp_configs_are_valid_accelerate_configs(name, monkeypatch):
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config_file = CONFIGS / name
    config, env, plugin = launch_settings(config_file, monkeypatch)
    assert f"accelerate launch --config_file configs/accelerate/{name}" in config_file.read_text()
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu
    if name == "ddp.yaml":
        assert config.distributed_type.value == "MULTI_GPU" and config.fsdp_config == {}
        assert "ACCELERATE_USE_FSDP" not in env and plugin is None
        return
    assert config.distributed_type.value == "FSDP" and config.mixed_precision == "bf16"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    policy = plugin.auto_wrap_policy
    assert getattr(policy, "func", policy) is transformer_auto_wrap_policy
    assert plugin.cpu_ram_efficient_loading  # rank 0 reads the weights, the others get them from it
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not plugin.activation_checkpointing  # finetune.py's --gradient_checkpointing is the one mechanism
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2 and plugin.fsdp_version == 2
        assert plugin.reshard_after_forward is True
        assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # no offloading
    else:
        assert config.fsdp_config["fsdp_version"] == 1 and plugin.fsdp_version == 1
        assert plugin.use_orig_params is False  # PEFT's QLoRA + FSDP guide
        assert plugin.sync_module_states  # FSDP1's cpu_ram_efficient_loading broadcasts through it
        assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
        assert plugin.cpu_offload.offload_params


# ---- fsdp_plan -----------------------------------------------------------------------------

def plan(**overrides):
    options = dict(device_type="cuda", load_in_8bit=False, load_in_4bit=False, use_fsdp=True, fsdp_version=2,
                   num_processes=4)
    return fsdp_plan(**{**options, **overrides})


def test_fsdp_plan_fsdp_configuration_on_a_cpu():
    result = plan(device_type="cpu", num_processes=2)  # FSDP2: sharded anyway, accelerate's state switched
    assert (result.sharded, result.error, result.switch_state, result.ddp_instead) == (True, False, True, False)
    assert result.line == ("FSDP2 on CPUs (gloo; accelerate alone would train DDP here, finetune.py shards as on GPUs): "
                           "each of the 2 processes holds 1/2 of the frozen base weights (one shard group per decoder "
                           "layer); the adapter is gathered at the end")
    result = plan(device_type="cpu", fsdp_version=1, load_in_4bit=True)  # FSDP1's plugin refuses a CPU: DDP, said
    assert (result.sharded, result.error, result.switch_state, result.ddp_instead) == (False, False, False, True)
    assert result.line == ("an FSDP1 configuration on a CPU: accelerate cannot shard there, so this run trains DDP "
                           "instead (every process holds the whole model); configs/accelerate/fsdp2.yaml shards on "
                           "CPUs too")
    result = plan(device_type="cpu", num_processes=1)
    assert (result.sharded, result.ddp_instead) == (False, True) and "nothing to shard" in result.line
    result = plan(device_type="mps")
    assert (result.sharded, result.ddp_instead) == (False, True) and result.line.startswith(
        "an FSDP2 configuration on a MPS: accelerate cannot shard there, so this run trains DDP instead")


def test_fsdp_plan_fsdp2_with_a_4bit_base_is_an_error():
    result = plan(load_in_4bit=True)
    assert result.error and not result.sharded
    assert result.line.startswith("a 4-bit base cannot be sharded with FSDP2")
    assert "configs/accelerate/fsdp_qlora.yaml" in result.line


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_fsdp_plan_8bit_under_fsdp_is_an_error(fsdp_version):
    result = plan(load_in_8bit=True, fsdp_version=fsdp_version)
    assert result.error and not result.sharded
    assert result.line.startswith(f"an 8-bit base cannot be sharded with FSDP{fsdp_version}")
    assert "configs/accelerate/ddp.yaml" in result.line and "configs/accelerate/fsdp_qlora.yaml" in result.line


def test_fsdp_plan_fsdp2_on_gpus():
    result = plan()
    assert (result.sharded, result.error, result.fsdp_version) == (True, False, 2)
    assert not result.quant_storage_as_compute_dtype
    assert result.line == ("FSDP2: each of the 4 processes holds 1/4 of the frozen base weights (one shard group per "
                           "decoder layer); the adapter is gathered at the end")


def test_fsdp_plan_qlora_with_fsdp1_stores_4bit_weights_in_the_compute_dtype():
    result = plan(load_in_4bit=True, fsdp_version=1, num_processes=2)
    assert result.sharded and not result.error and result.quant_storage_as_compute_dtype
    assert result.line.startswith("FSDP1 QLoRA") and "1/2" in result.line


def test_fsdp_plan_reads_what_accelerate_launch_set(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert fsdp_plan(device_type="cuda", load_in_8bit=True, load_in_4bit=False).line == ""  # no FSDP: nothing to say
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    result = fsdp_plan(device_type="cuda", load_in_8bit=False, load_in_4bit=False)
    assert result.sharded and result.fsdp_version == 2 and "1/8" in result.line
    assert "cuda" in FSDP_DEVICE_TYPES and "cpu" not in FSDP_DEVICE_TYPES


# ---- the configuration as shipped: bf16 mixed precision ------------------------------------

def test_fsdp2_bf16_mixed_precision_on_a_bf16_base(tiny_llama_dir, tmp_path, sharded):
    """fsdp2.yaml's own mixed_precision (bf16) on a bf16 base, still on CPUs: accelerate keeps the
    LoRA weights in fp32 (its upcast), the frozen ones in bf16 and sharded, and the losses stay near
    the fp32 run's."""
    launch("--model", tiny_llama_dir, "--out", tmp_path, "--steps", STEPS, "--dtype", "bfloat16",
           mixed_precision=None)
    result = result_of(tmp_path)
    for name, dtype in result["dtypes"].items():
        assert dtype == ("torch.float32" if "lora_" in name else "torch.bfloat16"), name
    for share in result["shares"]:
        assert share["unsharded"] == [] and share["local_bytes"] * 2 == share["total_bytes"]
    for step in range(1, STEPS + 1):
        assert abs(result["losses"][step] - sharded.result["losses"][step]) < 2e-2
