"""The book's exercises: check a reader's answer and say "not attempted", "wrong: ..." or "correct".

A chapter's exercise cells ship unanswered: a stub that raises ``NotImplementedError`` (a function or a class)
or a value left as ``...``. The solutions live beside the chapters, in ``chapters/solutions/NN_name.py``, one
block per exercise, written exactly as the reader would write the cell::

    # %% exercise 1
    def slot_of_token_37():
        return slot_mapping([5, 2, 9], 16)[37]

A notebook checks an answer by name; the solution block runs in a copy of the notebook's namespace, so it may
use everything the chapter defined, and the reader's names are left alone::

    lab = Lab("03")
    lab.check(1, "slot_of_token_37")          # calls both with no arguments and compares the results
    lab.check(2, "kept", 1.5, 0.9)            # calls both with these arguments
    lab.check(3, "answer", tol=1e-3)          # a value: compared within a tolerance
    lab.check(4, "StaticScheduler", test=f)   # a build: f(reader's, solution's) raises AssertionError if wrong

The expected answer is never printed: a wrong answer says what was got and, where given, a hint.
"""

from __future__ import annotations

import linecache
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOT_ATTEMPTED = "not attempted"
CORRECT = "correct"

_BLOCK = re.compile(r"^# %% exercise (\S+)[^\n]*\n", re.MULTILINE)


def solutions_dir() -> Path:
    """``chapters/solutions`` of this checkout (the notebooks run with ``chapters/`` as their folder)."""
    for base in (Path.cwd(), Path.cwd() / "chapters", Path(__file__).resolve().parent.parent / "chapters"):
        if (base / "solutions").is_dir():
            return base / "solutions"
    raise FileNotFoundError("chapters/solutions not found: run the notebook from the book's chapters/ folder")


def solution_blocks(chapter: str) -> dict[str, str]:
    """The solution blocks of a chapter (``"03"`` or ``"03_paged_kv"``): ``{exercise: source}``, in order."""
    files = sorted(solutions_dir().glob(f"{chapter}*.py"))
    if len(files) != 1:
        raise FileNotFoundError(f"chapter {chapter!r}: expected one solutions file {chapter}*.py, found {len(files)}")
    text = files[0].read_text()
    marks = list(_BLOCK.finditer(text))
    return {m.group(1): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip() + "\n"
            for i, m in enumerate(marks)}


def is_stub(value: Any) -> bool:
    """A value the reader has not filled in yet (``...``)."""
    return value is Ellipsis


def compare(got: Any, expected: Any, tol: float | None = None) -> str | None:
    """``None`` when ``got`` equals ``expected`` (within ``tol`` for numbers and tensors), else what differs."""
    if hasattr(expected, "shape") and hasattr(expected, "dtype"):  # a tensor or an array
        import torch

        got_t, exp_t = torch.as_tensor(got), torch.as_tensor(expected)
        if tuple(got_t.shape) != tuple(exp_t.shape):
            return f"shape {tuple(got_t.shape)}, expected shape {tuple(exp_t.shape)}"
        if tol is None and not exp_t.is_floating_point():
            return None if torch.equal(got_t.to(exp_t.dtype), exp_t) else "the values differ"
        diff = (got_t.double() - exp_t.double()).abs()
        both_inf = torch.isinf(got_t.double()) & (got_t.double() == exp_t.double())
        worst = float(diff.masked_fill(both_inf, 0).nan_to_num(math.inf).max()) if diff.numel() else 0.0
        return None if worst <= (tol or 1e-5) else f"values differ by up to {worst:.3g}"
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return None if got == expected else f"got {got!r}"
    if isinstance(expected, (int, float)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"got {got!r}, expected a number"
        if tol is None and isinstance(expected, int) and isinstance(got, int):
            return None if got == expected else f"got {got!r}"
        return None if math.isclose(got, expected, rel_tol=tol or 1e-9, abs_tol=tol or 1e-12) else f"got {got!r}"
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"got {got!r}, expected a dict with keys {sorted(expected, key=str)}"
        for k in expected:
            if (why := compare(got[k], expected[k], tol)) is not None:
                return f"[{k!r}]: {why}"
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"got {got!r}, expected {type(expected).__name__} of {len(expected)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            if (why := compare(g, e, tol)) is not None:
                return f"item {i}: {why}"
        return None
    return None if got == expected else f"got {got!r}"


class Lab:
    """The exercises of one chapter: ``Lab("03")``; ``check`` prints and records each exercise's status."""

    def __init__(self, chapter: str):
        self.chapter = chapter
        self.blocks = solution_blocks(chapter)
        self.results: dict[str, str] = {}

    def solution(self, exercise: Any, namespace: dict) -> dict:
        """A copy of ``namespace`` after running exercise ``exercise``'s solution block in it."""
        key = str(exercise)
        if key not in self.blocks:
            raise KeyError(f"chapter {self.chapter} has no solution for exercise {key!r} (has {list(self.blocks)})")
        ns = dict(namespace)
        source, filename = self.blocks[key], f"<solution {self.chapter}.{key}>"
        # registered like a file, so that inspect finds the source (Triton's JIT compiles a kernel from it)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), ns)
        return ns

    def check(self, exercise: Any, name: str, *args: Any, test: Callable | None = None, tol: float | None = None,
              hint: str | None = None, namespace: dict | None = None) -> None:
        """Check the reader's ``name`` (from the calling notebook's namespace) against the solution's.

        ``name`` is a value, or a function called with ``args`` on both sides; with ``test``, a function or class
        handed to ``test(reader's, solution's)``, which raises ``AssertionError("what is wrong")``."""
        ns = sys._getframe(1).f_globals if namespace is None else namespace
        status = self._status(exercise, name, args, test, tol, ns)
        if hint and status.startswith("wrong"):
            status += f" (hint: {hint})"
        self.results[str(exercise)] = status
        print(f"Exercise {exercise}: {status}")

    def _status(self, exercise, name, args, test, tol, ns) -> str:
        if name not in ns or is_stub(ns[name]):
            return NOT_ATTEMPTED
        reference = self.solution(exercise, ns)[name]
        got = ns[name]
        try:
            if test is not None:
                test(got, reference)
                return CORRECT
            value = got(*args) if callable(got) else got
        except NotImplementedError:
            return NOT_ATTEMPTED
        except AssertionError as e:
            return f"wrong: {e}" if str(e) else "wrong"
        except Exception as e:  # the reader's code raised: say what, the notebook goes on
            return f"wrong: raised {type(e).__name__}: {e}"
        if is_stub(value):
            return NOT_ATTEMPTED
        expected = reference(*args) if callable(reference) else reference
        why = compare(value, expected, tol)
        return CORRECT if why is None else f"wrong: {why}"
