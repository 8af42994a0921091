"""Data: corpus assembly, readers/writers and (later) selection — the survey's data-centric part."""
