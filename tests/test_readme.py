"""The README's ``python`` blocks run, in order, in one namespace, as a reader would paste
them; a ``# ...`` comment on the line right after a ``print(...)`` is that print's output.

A block preceded by ``<!-- not run: reason -->`` is skipped (code that needs several hosts,
or that stands for a reader's own objects). Printed numbers are compared to 1e-6 relative;
a number written as ``2.0379...`` matches any value that starts with those digits."""

import ast
import contextlib
import io
import math
import re
import textwrap
import warnings
from pathlib import Path

import jax

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:(<!-- not run: [^>]*-->)\n)?([ \t]*)```python\n(.*?)\n\2```", re.S)
_TOKEN = re.compile(r"[\[\](),]|[^\s\[\](),]+")


def readme_blocks() -> list[tuple[str | None, str]]:
    """``(skip reason or None, code)`` for every ``python`` block of the README, in order."""
    return [
        (skip, textwrap.dedent(code).strip("\n"))
        for skip, _, code in _BLOCK.findall(README.read_text())
    ]


def _matches(actual: str, expected: str) -> bool:
    got, want = _TOKEN.findall(actual), _TOKEN.findall(expected)
    if len(got) != len(want):
        return False
    for a, w in zip(got, want, strict=True):
        if w.endswith("...") and len(w) > 3:
            if not a.startswith(w[:-3]):
                return False
            continue
        try:
            if not math.isclose(float(a), float(w), rel_tol=1e-6, abs_tol=1e-12):
                return False
        except ValueError:
            if a != w:
                return False
    return True


def _is_print(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Call)
        and getattr(statement.value.func, "id", None) == "print"
    )


def test_the_readme_code_runs_and_prints_what_it_shows():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    skipped = [reason for reason, _ in blocks if reason]
    assert len(skipped) <= 2, skipped  # the few that cannot run here, each with its reason
    namespace: dict = {"__name__": "readme"}
    compared = 0
    # A reader runs the README under JAX's defaults, not this suite's strict promotion rules.
    # (and the README's own warnings filter must not outlive this test)
    with (
        warnings.catch_warnings(),
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
    ):
        compared = _run(blocks, namespace)
    assert compared >= 5


def _run(blocks: list, namespace: dict) -> int:
    compared = 0
    for reason, code in blocks:
        if reason:
            continue
        lines = code.split("\n")
        for statement in ast.parse(code).body:
            program = compile(ast.Module([statement], type_ignores=[]), "README.md", "exec")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(program, namespace)
            after = lines[statement.end_lineno] if statement.end_lineno < len(lines) else ""
            if _is_print(statement) and after.startswith("# "):
                shown, printed = after[2:], out.getvalue().strip()
                assert _matches(printed, shown), (
                    f"README line {ast.unparse(statement)!r} printed {printed!r}, "
                    f"the README shows {shown!r}"
                )
                compared += 1
    return compared


def test_the_readme_output_check_can_fail():
    assert _matches("True 17 [0.31883447 0.7848]", "True 17 [0.3188344700001 0.7848]")
    assert _matches("CONVERGED [ 2.03791 -1.01]", "CONVERGED [ 2.0379... -1.01]")
    assert not _matches("True 18", "True 17")
    assert not _matches("[2.0479]", "[2.0379...]")
    assert not _matches("False", "True")
