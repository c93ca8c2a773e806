"""Toolchains: turn generated source text into artifact bytes. They know nothing of the IR."""
