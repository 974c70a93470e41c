"""Progress a person can follow: under a terminal `growlm train` shows rich bars (with rate and ETA);
without one (CI, a file) it writes plain log lines with elapsed time and ETA, and no bar or carriage return."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

BAR = "━"  # rich's bar glyph (tables in plain output are ASCII)


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    return [sys.executable, "-m", "growlm.cli", "train", "--model.name", "tiny-llama", "--model.init", "scratch",
            "--model.tokenizer", "bytes", "--model.overrides", "{vocab_size: 257, n_layer: 1, n_embd: 16, n_head: 2, n_kv_head: 1, ffn_size: 32}",
            "--data.path", str(tmp / "corpus.txt"), "--data.seq_len", "16", "--data.val_blocks", "4",
            "--data.cache_dir", str(tmp / "cache"), "--run.max_steps", "40", "--run.micro_batch", "2",
            "--run.eval_every", "20", "--run.log_every", "10", "--run.peak_flops", "1e12", "--run.save_every", "0",
            "--run.export_hf", "false"], tmp


def _env():
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONPATH": os.pathsep.join(sys.path)}


def test_a_terminal_sees_the_progress_bar(argv):
    cmd, tmp = argv
    master, slave = pty.openpty()
    proc = subprocess.Popen([*cmd, "--run.out_dir", str(tmp / "tty")], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(), close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + 240
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    text = out.decode(errors="replace")
    assert BAR in text and "tok/s" in text and "eta" in text, text[-2000:]
    assert "step 00040/00040" in text


def test_without_a_terminal_the_log_is_plain(argv):
    cmd, tmp = argv
    r = subprocess.run([*cmd, "--run.out_dir", str(tmp / "plain")], capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert BAR not in out and "\r" not in out and "\x1b" not in out, out[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 00000/00040", "step 00010/00040", "step 00020/00040",
                                                    "step 00030/00040", "step 00040/00040"]
    assert all("elapsed " in ln for ln in lines) and all("| eta " in ln for ln in lines[2:]), lines
