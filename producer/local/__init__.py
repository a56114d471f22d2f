"""What the package runs on this machine: a throwaway Redis server (for the demo and the tests), and the
one worker command line (for `qvq worker`, the demo, the tests and the benchmarks)."""
