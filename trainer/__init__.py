"""Distributed training: config, process group, sharding plan, training loop and torchx component."""
