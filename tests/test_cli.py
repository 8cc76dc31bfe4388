"""``python -m nanovllm``: a user error is one line ``prog: error: ...`` and exit 2, found before the model is
read; Ctrl-C is one line and exit 130, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr("nanovllm.llm.LLM", no_loading)
    monkeypatch.setattr("nanovllm.LLM", no_loading, raising=False)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "model '/no/such/model': no such file or folder"),
    (["--tp", "0"], "tensor_parallel_size must be >= 1, got 0"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "float8"], "unknown dtype='float8'"),
    (["--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
    (["--temperature", "-1"], "temperature"),
    (["--max-num-seqs", "abc"], "argument --max-num-seqs: invalid int value: 'abc'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys, nothing_loads):
    from nanovllm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["hello", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m nanovllm: error: "), err
    assert message in err


def test_an_unknown_hub_id_is_one_line(capsys, nothing_loads):
    """Offline (the hub unreachable) or online (no such repository), an id the hub cannot give is one line
    naming the model, no traceback."""
    from nanovllm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["hello", "--model", "nanovllm-tests/no-such-model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m nanovllm: error: model 'nanovllm-tests/no-such-model' is not a local path")


def test_parser_errors_stay_one_line_whatever_the_message():
    from nanovllm.__main__ import Parser, one_line

    assert one_line("a\n  b\tc\n") == "a b c"
    p = Parser(prog="tool")
    with pytest.raises(SystemExit) as exit_info:
        p.error("first\nsecond")
    assert exit_info.value.code == 2


def terminal_sigint() -> None:
    """Ctrl-C handled as under a terminal.  A test run started in the background by a shell without job control
    (``cmd &`` in a script) inherits SIGINT ignored, and Python then sets up no KeyboardInterrupt at all.  For
    ``preexec_fn`` of every test process that is sent Ctrl-C (test_serve.py's too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, **env):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            preexec_fn=terminal_sigint if os.name == "posix" else None)


def interrupt_when(proc, stream, marker: str, timeout: float = 120.0) -> tuple[str, str]:
    """Wait until ``marker`` appears on the process's ``stream``, send it Ctrl-C (SIGINT), and return its
    (stdout, stderr) after it exits."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            time.sleep(0.5)  # well inside the generation loop
            proc.send_signal(signal.SIGINT)
            break
    else:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # Ctrl-C lost: fail with what it printed, and leave no process behind
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 60 s after Ctrl-C (SIGINT); its stdout ends\n{out[-2000:]}\nits stderr ends\n"
                    f"{err[-4000:]}")
    if stream == "stdout":
        return "".join(seen) + out, err
    return out, "".join(seen) + err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_exits_130_with_one_line():
    proc = start(["-m", "nanovllm", "--device", "cpu", "--max-tokens", "4000", "--raw", "Count to a million:"])
    out, err = interrupt_when(proc, "stdout", "loaded LLM(")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "python -m nanovllm: interrupted"
