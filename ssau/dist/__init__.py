"""Distributed set-up: ranks and devices, collectives, random number generators, DeepSpeed engines and
accelerate launch's options."""
