"""Test doubles and throwaway servers shared by tests (and benchmarks); never installed."""
