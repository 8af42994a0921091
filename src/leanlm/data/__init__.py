"""Data, the survey's data-centric part: corpus assembly, readers/writers, selection (dedup,
filters, DSIR, perplexity filtering), token caches and loaders (``tokens.py``) and texts for
calibration (``text.py``). Independent of quant and peft; DoReMi, which trains models, is in
``train/``."""
