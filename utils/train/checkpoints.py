"""Checkpoints every training stage writes (finetune.py, finetune_rl.py): each one whole or skipped
(a completion marker, written last), each one an adapter that carries its training prompt."""

from pathlib import Path

import torch.distributed as dist
import transformers

from utils.errors import CodeUpError
from utils.files import write_atomically
from utils.logs import logger
from utils.prompter import CHAT, load_template, save_template_record

CHECKPOINT_COMPLETE = "checkpoint_complete"  # written last into each checkpoint that is whole


def record_prompt_template(trainer, *, prompt_template: str, output_dir: str) -> None:
    """The template travels with the adapter: generate.py, evaluate.py and export_checkpoint.py
    prompt it (and exports carry it as their chat template) exactly as it was trained. Written into
    --output_dir now, and into each checkpoint before its completion marker, so that a checkpoint
    marked whole always has its template."""
    template_record = dict(name=Path(prompt_template).stem, template=None if prompt_template == CHAT
                           else load_template(prompt_template))
    if trainer.is_world_process_zero():
        save_template_record(output_dir, **template_record)
    trainer.callback_handler.callbacks.insert(0, RecordPromptTemplate(template_record))


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT_COMPLETE).is_file()


def find_checkpoint(resume_from_checkpoint, *, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: the one named, or with True the latest whole one in
    output_dir. A checkpoint whose writing was interrupted has no completion marker and is skipped.
    A folder named explicitly may lack the marker if it is a plain transformers checkpoint (one
    written by another Trainer script): it must hold trainer_state.json, and is used with a warning."""
    if resume_from_checkpoint in (None, False, "", "False", "false"):
        return None
    if resume_from_checkpoint in (True, "True", "true"):
        folders = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
        for folder in reversed(folders):
            if is_complete_checkpoint(folder):
                return str(folder)
            logger.warning(f"skipping {folder}: its writing did not finish")
        raise CodeUpError(f"--resume_from_checkpoint: no whole checkpoint in {output_dir}")
    folder = Path(str(resume_from_checkpoint)).expanduser()
    if not folder.is_dir():
        raise CodeUpError(f"--resume_from_checkpoint: {folder} is not a folder")
    if not is_complete_checkpoint(folder):
        if not (folder / "trainer_state.json").is_file():
            raise CodeUpError(f"--resume_from_checkpoint: {folder} is not a whole checkpoint "
                              "(no trainer_state.json: its writing did not finish)")
        logger.warning(f"{folder} has no {CHECKPOINT_COMPLETE} marker (a plain transformers checkpoint, or one "
                      "whose writing was interrupted): resuming from it as asked")
    return str(folder)


class RecordPromptTemplate(transformers.TrainerCallback):
    """Writes the training prompt template into each checkpoint (a checkpoint is an adapter too)."""

    def __init__(self, record: dict):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_template_record(Path(args.output_dir) / f"checkpoint-{state.global_step}", **self.record)


class MarkCompleteCheckpoints(transformers.TrainerCallback):
    """Writes a marker into each checkpoint once every process has finished writing it, so that
    resuming never picks a checkpoint that a killed process left half-written."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the other processes' RNG states are in the folder too
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_atomically(folder / CHECKPOINT_COMPLETE, f"{state.global_step}\n")
