"""The ServerApp side: strategy, aggregation, checkpoints, results."""
