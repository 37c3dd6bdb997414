"""Training a student: the trainer, its flags, data sources, the latent cache, checkpoints."""
