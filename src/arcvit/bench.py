"""Placeholder replaced by the bench module."""


def add_bench_commands(sub) -> None:
    return None
