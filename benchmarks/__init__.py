"""Benchmarks comparing the engine with the tools users would pick instead."""
