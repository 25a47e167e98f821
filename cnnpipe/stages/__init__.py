"""One module per stage; each exposes `run(cfg, <paths>) -> dict` and knows nothing of its caller."""
