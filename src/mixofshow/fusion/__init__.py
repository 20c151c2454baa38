"""Center-node fusion of concept files: solvers, statistics, orchestration."""
