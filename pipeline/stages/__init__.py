"""One module per DVC stage (and `predict`), each run as `python -m pipeline.stages.<name>`."""
