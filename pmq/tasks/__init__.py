"""Task workers: blocking work kept off the socket workers' loops (storage writes, sweeps)."""
