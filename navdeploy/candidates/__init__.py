"""Candidates: one (runner, precision) pair of a module graph, built, verified against eager, profiled and
selected; the isolated workers that run them and the gate that keeps profiling alone."""
