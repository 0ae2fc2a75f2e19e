"""What the training stages train with: per-example attention for packed rows (attention.py), the loss
without full logits (loss.py), the CPU speed-ups behind one switch (speedups/), checkpoints every
training stage writes (checkpoints.py), finetune.py's pass@1 while training (code_eval.py, through
evaluate.py's scorer), and finetune_rl.py's problems and sandbox reward (rewards.py) and
its trainer, TRL's GRPOTrainer with faster sampling and log-probabilities on a CPU (grpo.py)."""
