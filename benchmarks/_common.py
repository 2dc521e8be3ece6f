"""Shared by the benchmark scripts: the project's own paired, interleaved timing."""
from ticketsmith.bench import calibrate, machine, paired  # noqa: F401
