"""tgastream.model: the TGA network, baselines, batching, evaluation and training."""
