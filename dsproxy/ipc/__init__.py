"""Inter-process state: shared memory, locks, process identity, operation counters."""
