"""The `b10-compile-cache` command (placeholder; the vLLM companion replaces it)."""


def main() -> None:
    ...
