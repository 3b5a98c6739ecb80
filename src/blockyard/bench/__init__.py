"""Benchmarks that measure blockyard beside a plain peer in the same run and print ratios."""
