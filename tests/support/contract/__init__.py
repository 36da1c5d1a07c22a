"""The contract suite's machinery; its test modules are in tests/contract/ (whose __init__ says how it works)."""
