"""Progress bars (vflowopt.progress): on a terminal only, never in --json mode or when stderr is redirected."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from vflowopt.progress import ProgressBar, stderr_is_terminal
from vflowopt.tiny import build_inputs, example_image


def _terminal(monkeypatch):
    """Make the captured stderr claim to be a terminal (what a user's shell gives)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    assert not stderr_is_terminal()  # pytest captures stderr
    with ProgressBar(3, "eval") as bar:
        assert not bar.enabled
        bar.update(advance=1, description="x")
    assert capsys.readouterr().err == ""


def test_bar_on_a_terminal_and_off_when_disabled(capsys, monkeypatch):
    _terminal(monkeypatch)
    with ProgressBar(2, "eval") as bar:
        assert bar.enabled
        bar.update(advance=2, description="random 0.5")
    assert "eval" in capsys.readouterr().err
    with ProgressBar(2, "eval", enabled=False) as bar:  # --json
        assert not bar.enabled
    with ProgressBar(2, "eval", done=2) as bar:  # nothing left to do
        assert not bar.enabled
    assert capsys.readouterr().err == ""


def test_forced_console_shows_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with ProgressBar(4, "trial", fields={"best": "best -"}, console=console) as bar:
        bar.update(completed=2, best="best 0.5000")
    text = out.getvalue()
    assert "trial" in text and "2/4" in text and "best 0.5000" in text and "left" in text


def test_optimize_bar_follows_the_rule(capsys, monkeypatch):
    from vflowopt.search.study import _Progress

    assert not _Progress(True, total=3, done=0, best=None).enabled  # not a terminal
    _terminal(monkeypatch)
    assert _Progress(True, total=3, done=0, best=None).enabled
    assert not _Progress(False, total=3, done=0, best=None).enabled  # --json
    with _Progress(True, total=3, done=0, best=None, label="vflowopt") as bar:
        bar.update(3, 0.25)
    assert "best 0.2500" in capsys.readouterr().err


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_bar(make_model, capsys, monkeypatch, terminal):
    from vflowopt.bench.run import run_bench

    if terminal:
        _terminal(monkeypatch)
    model, processor = make_model("llava_onevision")
    inputs = build_inputs(processor, [example_image(seed=0)], ["What is in the image?"])
    run_bench(model, inputs, ["random"], [0.5], new_tokens=1, repeats=1, warmup=0, progress=True)
    err = capsys.readouterr().err
    assert ("bench" in err and "2/2" in err) if terminal else "bench" not in err


def test_eval_prints_no_progress_lines_when_redirected(capsys, tmp_path, monkeypatch):
    from vflowopt.cli import main
    from vflowopt.vqa import model as M

    model, processor = M.build_model("tiny", seed=0)
    folder = M.save(model, processor, tmp_path / "vqa")
    args = ["eval", "--model", str(folder), "--methods", "random", "--budgets", "1.0,0.5", "--n", "2",
            "--batch-size", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "random" in captured.out and "random 0.5" not in captured.err and "eval" not in captured.err
    _terminal(monkeypatch)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "eval" in err and "2/2" in err
