"""Training: the loop, its state and checkpoints, batches, schedule, distributed workers, fine-tuning."""
