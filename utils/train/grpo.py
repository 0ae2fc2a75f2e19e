"""finetune_rl.py's trainer: TRL's GRPOTrainer (the algorithm, the loss, the logging: all TRL's),
with its two costly inner steps done faster on a CPU, where both are most of a step
(bench/bench_rl.py, bench/RESULTS.md):

- sampling: `generate` with the KV cache, under inference mode, the next token drawn from the same
  softmax(logits / temperature) by one uniform number per answer (a cumulative sum and a binary
  search) in place of torch.multinomial, whose exponential draws over the whole vocabulary took
  15% of the sampling time; the frozen weights multiply through the speed-ups' packs there too;
- the policy's per-token log-probabilities: utils/train/loss.py's linear_log_probs, whose backward
  reuses the input gradient computed in the forward (TRL's CPU path recomputes the logits chunk by
  chunk in its backward and folds five optional statistics into every chunk).

Both step aside (TRL's own code runs) where they do not apply: off a CPU (TRL's Triton kernel and
multinomial sampling are fast on a GPU), FSDP or DeepSpeed, vLLM or continuous batching, images,
top-p/top-k/min-p/repetition penalties, a head that is more than a matmul (utils/train/loss.py's
head_of), a trainable head, a mixture of experts' router loss; and `chunked_loss = False` (what
`--cpu_speedups False` sets, through utils/train/speedups/) turns both off.
"""

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from utils.train.loss import head_of, head_skipped, linear_log_probs
from utils.train.speedups.packed_weights import packed_weight_of


class InverseCdfSample:
    """A logits processor that draws the next token from softmax(scores) and leaves only it possible
    (every other score -inf), so that greedy decoding takes it: the same distribution as sampling,
    one uniform number per row (torch.multinomial draws one exponential per vocabulary entry)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, input_ids, scores):
        cumulative = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        uniform = torch.rand((scores.shape[0], 1), device=scores.device, generator=self.generator)
        tokens = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


class SandboxGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with faster sampling and per-token log-probabilities where they apply (module docstring)."""

    chunked_loss = True  # utils/train/speedups/ turns it off with the other speed-ups (--cpu_speedups False)

    def _fast_sampling_applies(self) -> bool:
        return (self.chunked_loss and self.accelerator.device.type == "cpu" and not self.is_fsdp_enabled
                and not self.is_deepspeed_enabled and not self.use_vllm and not self.use_transformers_continuous_batching
                and not self.top_k and (self.top_p is None or self.top_p >= 1.0) and not self.min_p
                and (self.repetition_penalty is None or self.repetition_penalty == 1.0))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images or multimodal_fields or not self._fast_sampling_applies():
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images=has_tool_images)
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper

        tensors = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                        pad_to_multiple_of=self.pad_to_multiple_of)
        attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left",
                             pad_to_multiple_of=self.pad_to_multiple_of)
        inputs = {"input_ids": input_ids.to(self.accelerator.device), "attention_mask": attention_mask.to(self.accelerator.device)}
        processors = LogitsProcessorList([TemperatureLogitsWarper(self.temperature), InverseCdfSample()])
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_completion_length, use_cache=True,
                                  eos_token_id=self.eos_token_ids, pad_token_id=self._tokenizer.pad_token_id)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.inference_mode()):
            was_training = model.training
            model.eval()
            try:
                generated = model.generate(**inputs, generation_config=config, logits_processor=processors)
            finally:
                model.train(was_training)
        completions = generated[:, inputs["input_ids"].shape[1]:].cpu()
        # Each answer up to and including its first end-of-sequence token, as TRL cuts them.
        is_end = torch.isin(completions, torch.tensor(self.eos_token_ids))
        ends = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), completions.shape[1] - 1)
        return [row[:end + 1].tolist() for row, end in zip(completions, ends.tolist())], None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        on_cpu = input_ids.device.type == "cpu"  # on a GPU, TRL's Triton kernel
        head = head_of(self.accelerator.unwrap_model(model)) if self.chunked_loss and on_cpu else None
        if (head is None or head.weight.requires_grad or compute_aux_loss
                or any(value is not None for value in multimodal.values())):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        log_probs, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            # The hidden states of the last logits_to_keep + 1 positions: position t predicts token t + 1.
            with self.accelerator.autocast(), head_skipped(head):
                hidden = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1,
                               use_cache=False).logits[:, :-1]
            with self.accelerator.autocast():
                batch_log_probs, batch_entropy = linear_log_probs(hidden, head.weight, ids[:, -logits_to_keep:],
                                                                  temperature=self.temperature,
                                                                  packed=packed_weight_of(head))
            log_probs.append(batch_log_probs)
            entropies.append(batch_entropy)
        return torch.cat(log_probs), torch.cat(entropies) if compute_entropy else None, None
