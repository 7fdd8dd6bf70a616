"""The machinery of a training run, under train.py's loop.

config (TrainConfig, the recipes, the CLI built from them), runtime (device, bf16, seeding, DDP,
stop signals), checkpoint (the checkpoint format), step (forward, backward and optimizer step;
CUDA graph), optim, ema (weight averages), distill (knowledge distillation), device_loader (the
data on the device, augmented there) with policy_workers (the --augment policy in worker
processes), evaluation (loss and accuracy with TTA), run (setting a run up), run_files (what a run
writes where, and resuming it), tensorboard_log.

Imports run down: training uses data.py, model.py, reports/ and files/, never an entry point.
"""
