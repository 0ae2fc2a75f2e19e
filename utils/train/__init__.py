"""What finetune.py trains with: per-example attention for packed rows (attention.py), the loss
without full logits (loss.py), and the CPU speed-ups behind one switch (speedups/)."""
