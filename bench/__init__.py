"""Benchmarks (`tgastream bench NAME`): the top layer, free to use every other one."""
