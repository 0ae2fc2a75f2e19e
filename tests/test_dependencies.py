"""Installs are reproducible: requirements-lock.txt pins every package within the ranges of
requirements*.txt, and the code that leans on a dependency's internals is on where those internals
are the ones it was tested against (the pinned versions) and off, saying so, anywhere else."""

import importlib.metadata
import re
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

from utils.train.speedups import source_code
from utils.train.speedups.rotary import untested_rotary


def lock_pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def ranges() -> list:
    found = []
    for file in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                found.append(Requirement(line))
    return found


def installed_as_pinned(package: str) -> bool:
    return Version(importlib.metadata.version(package)).public == lock_pins()[package]


def test_the_lock_pins_every_requirement_within_its_range():
    pins = lock_pins()
    for requirement in ranges():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not in requirements-lock.txt: bash setup.sh --upgrade-pins"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not in {requirement}"
    assert pins["torch"] == "2.13.0"  # the CPU build on this machine's disk; PyPI's CUDA build elsewhere
    assert {"triton", "nvidia-cublas"} <= set(pins)  # what only the CUDA build pulls in, pinned too


def test_the_lock_pins_what_the_pinned_packages_require():
    """Every dependency of every pinned package (for Python 3.11 on Linux) is pinned too, and within
    the range it asks for: the lock is a whole resolution, not a list of direct requirements."""
    pins = lock_pins()
    environment = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux",
                   "platform_machine": "x86_64", "extra": ""}
    for package in ("transformers", "peft", "accelerate", "gradio", "trl", "datasets"):
        for line in importlib.metadata.requires(package) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            name = re.sub(r"[-_.]+", "-", requirement.name).lower()
            assert name in pins, f"{package} needs {name}, which requirements-lock.txt does not pin"
            assert requirement.specifier.contains(pins[name], prereleases=True), f"{package} needs {requirement}"


def test_setup_reads_its_flags_and_refuses_others():
    assert subprocess.run(["bash", "-n", ROOT / "setup.sh"]).returncode == 0
    refused = subprocess.run(["bash", ROOT / "setup.sh", "--pinned-by-hand"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--upgrade-pins" in refused.stderr


def test_on_the_pinned_transformers_the_cpu_kernels_are_on():
    """The pins are what the kernels were tested against: there, every reference is in TESTED_CODE."""
    if not installed_as_pinned("transformers"):
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} is not the pinned "
                    f"{lock_pins()['transformers']} (bash setup.sh --unpinned): the next test checks it")
    assert untested_rotary() is None
    assert source_code.untested_code(source_code.llama_references()) is None


def test_on_any_transformers_the_kernels_are_on_exactly_where_tested(capsys):
    """Whatever transformers is installed: where its Llama code is tested the kernels go on (their
    own tests check the bits), and elsewhere they stay off and the run's one line says why."""
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.train.speedups import training_speedups

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).bfloat16().requires_grad_(False)
    with training_speedups(types.SimpleNamespace(model=model, chunked_loss=True)) as on:
        pass
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("speed-ups:")]
    references = source_code.llama_references()
    rotary_tested = all(source_code.fingerprint(references[name]) in source_code.TESTED_CODE[name]
                        for name in ("apply_rotary_pos_emb", "rotate_half"))
    norm_tested = source_code.fingerprint(references["LlamaRMSNorm.forward"]) in source_code.TESTED_CODE["LlamaRMSNorm.forward"]
    assert ("rotary embeddings" in on) == rotary_tested and ("RMSNorm" in on) == norm_tested
    off = said[0].split("; off: ")[1]
    assert ("rotary embeddings (transformers" in off) != rotary_tested
    assert ("RMSNorm (transformers" in off) != norm_tested
