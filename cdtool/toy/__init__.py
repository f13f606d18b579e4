"""A procedural image world small enough to train and judge text-to-image models on a CPU."""
