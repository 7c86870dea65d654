"""Whether Triton's CPU interpreter (TRITON_INTERPRET=1) can run here."""
from __future__ import annotations


def interpreter_broken_reason() -> str | None:
    """Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 refuses
    (triton-lang/triton#9171, fixed after 3.6): the reason to skip, or None."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split(".")[:2])

    if major_minor(triton.__version__) <= (3, 6) and major_minor(numpy.__version__) >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (needs numpy < 2.4)"
    return None
