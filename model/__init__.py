"""The seq2seq recommender as plain ``nn.Module``s (no process groups, planners or launch logic here)."""
