"""Codegen: pure functions from (typed kernel IR, ArgSpec) to source text."""
