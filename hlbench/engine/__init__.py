"""Training engine: distributed setup, optimiser/schedule, checkpoints, evaluation and the train loop."""
