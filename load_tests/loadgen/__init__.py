"""Built-in load generator and helpers behind load_tests/run.py and benchmarks/serving.py."""
