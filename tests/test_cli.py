"""The ``tilec`` command line, in-process through ``tilec.cli.main`` (and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tilec.cli import main

from conftest import MIMO_FILE, REPO


def write(path, source: str):
    path.write_text(textwrap.dedent(source))
    return path


def line_number(path, needle: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at 80 columns when stdout is not a terminal; a wide console keeps lines whole for the checks."""
    monkeypatch.setenv("COLUMNS", "400")


def test_compile_writes_artifact_and_prints_stage_table(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "-o", str(out), "--max-seq-len", "64"]) == 0
    stdout = capsys.readouterr().out
    assert "compiled MiMo 4 layers, hidden 64" in stdout and "reference" in stdout
    for word in ("stage", "nodes", "capture", "dead_code", "attention 4", "linear 20"):
        assert word in stdout, (word, stdout)
    assert "parameters 307,296" in stdout and f"wrote {out.resolve()}" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"] == ["capture", "dead_code", "fuse_add_rms_norm", "fuse_qkv_rope", "fuse_swiglu"] and manifest["target"] == "reference"
    report = json.loads((out / "report.json").read_text())
    assert report["specialised_for"]["max_seq_len"] == 64
    for f in ("report.md", "stages/00_capture.txt", "stages/00_capture.py", "stages/01_dead_code.txt",
              "stages/01_dead_code.py"):
        assert (out / f).is_file(), f


def test_inspect_prints_summary_and_stage_listing(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "-o", str(out), "--batch", "2"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "target reference" in summary and "MiMo 4 layers" in summary
    assert "capture" in summary and "dead_code" in summary and "parameters 307,296" in summary
    assert "stages/00_capture.txt" in summary  # the file list

    assert main(["inspect", str(out), "--stage", "capture"]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0] == "# stage 0: capture"
    assert "input  %input_ids: i64[2, 1]" in listing  # specialised for --batch 2
    assert "%l0_self_attn_attention = tilec.attention(" in listing
    assert listing == (out / "stages" / "00_capture.txt").read_text()

    assert main(["inspect", str(out), "--stage", "nope"]) == 2
    err = capsys.readouterr().err
    assert "has no stage 'nope'" in err and "capture, dead_code" in err


def test_compile_as_a_real_subprocess(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "tilec", "compile", "models/mimo.py", "--preset", "tiny", "-o",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "capture" in proc.stdout and "dead_code" in proc.stdout and f"wrote {out}" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["stages"] == ["capture", "dead_code", "fuse_add_rms_norm", "fuse_qkv_rope", "fuse_swiglu"]


def test_inspect_stage_listing_is_not_wrapped_when_piped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = tmp_path / "tiny"
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "-o", str(out), "--max-seq-len", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--stage", "capture"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == (out / "stages" / "00_capture.txt").read_text().rstrip("\n")


def test_module_level_model_file(tmp_path, capsys):
    src = write(tmp_path / "user_model.py", """\
        import torch
        from torch import nn

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(50, 16)
                self.head = nn.Linear(16, 50)

            def forward(self, input_ids):
                return self.head(self.embed(input_ids))

        torch.manual_seed(0)
        model = LM()
        """)
    out = tmp_path / "out"
    assert main(["compile", str(src), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "compiled LM" in stdout and "embedding 1, linear 1" in stdout
    assert "%head = tilec.linear(%embed, head.weight, head.bias)" in (out / "stages" / "01_dead_code.txt").read_text()


def test_module_level_mimo_model_file(tmp_path, capsys):
    src = write(tmp_path / "mimo_model.py", """\
        from tilec.models import build_model as make
        model = make("tiny", num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                     mlp_layer_types=["dense", "sparse"])
        """)
    assert main(["compile", str(src), "--max-seq-len", "32"]) == 0
    stdout = capsys.readouterr().out
    assert "MiMo 2 layers" in stdout and "attention 2," in stdout and "wrote" not in stdout


def test_module_level_model_wins_over_an_imported_build_model(tmp_path, capsys):
    src = write(tmp_path / "mimo_model.py", """\
        from tilec.models import build_model
        model = build_model("tiny", num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                            mlp_layer_types=["dense", "sparse"])
        """)
    assert main(["compile", str(src), "--max-seq-len", "32"]) == 0
    assert "MiMo 2 layers" in capsys.readouterr().out


def test_file_without_model_exits_2_naming_both(tmp_path, capsys):
    src = write(tmp_path / "empty_model.py", "x = 1\n")
    assert main(["compile", str(src)]) == 2
    captured = capsys.readouterr()
    assert "build_model()" in captured.err and "`model`" in captured.err and str(src) in captured.err
    assert captured.err.strip().startswith("tilec: error: ")


GELU_FILE = """\
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return F.gelu(self.fc(x))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.block = Block()

        def forward(self, input_ids):
            return self.block(self.embed(input_ids))

    def build_model():
        return LM()
    """


def test_unsupported_op_exits_2_naming_the_op(tmp_path, capsys):
    src = write(tmp_path / "gelu_model.py", GELU_FILE)
    assert main(["compile", str(src)]) == 2
    err = capsys.readouterr().err
    assert "gelu" in err and "'block'" in err and "Supported:" in err


def test_unsupported_op_exits_2_naming_the_line(tmp_path, capsys):
    src = write(tmp_path / "gelu_model.py", GELU_FILE)
    assert main(["compile", str(src)]) == 2
    err = capsys.readouterr().err
    line = line_number(src, "F.gelu")
    assert "gelu_model.py" in err and (f"gelu_model.py:{line}" in err or f"gelu_model.py, line {line}" in err), err


def test_missing_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.py"
    assert main(["compile", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not a Python file" in err
    assert main(["compile", str(tmp_path)]) == 2  # a directory is not a model file either
    assert "not a Python file" in capsys.readouterr().err


def test_file_that_raises_on_import_names_the_line(tmp_path, capsys):
    src = write(tmp_path / "broken_model.py", """\
        import torch

        SIZE = 4
        table = {"a": 1}
        value = table["missing"]
        """)
    assert main(["compile", str(src)]) == 2
    err = capsys.readouterr().err
    assert "failed to import" in err and "line 5" in err and "KeyError" in err and 'table["missing"]' in err


def test_preset_with_a_model_only_file_exits_2(tmp_path, capsys):
    src = write(tmp_path / "only_model.py", """\
        from tilec.models import build_model as _build
        model = _build("tiny")
        """)
    assert main(["compile", str(src), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--preset needs build_model(preset)" in err and "only defines `model`" in err


def test_preset_with_a_build_model_taking_no_preset_exits_2(tmp_path, capsys):
    src = write(tmp_path / "no_preset.py", """\
        from tilec.models import build_model as _build
        def build_model():
            return _build("tiny")
        """)
    assert main(["compile", str(src), "--preset", "tiny"]) == 2
    assert "build_model() takes no preset" in capsys.readouterr().err


def test_unknown_preset_exits_2(capsys):
    assert main(["compile", str(MIMO_FILE), "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown MiMo preset 'huge'" in err and "tiny" in err


def test_cuda_target_writes_the_megakernel(tmp_path, monkeypatch):
    """The cuda target compiles without a GPU: the megakernel's source and the Triton kernels it uses for prefill."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "--target", "cuda", "-o", str(tmp_path / "a")]) == 0
    assert "tilec_megakernel" in (tmp_path / "a" / "megakernel.cu").read_text()
    assert (tmp_path / "a" / "step.py").is_file() and "## Megakernel" in (tmp_path / "a" / "report.md").read_text()


def test_inspect_of_a_non_artifact_directory_exits_2(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("hello")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a tilec artifact" in err and "manifest.json" in err and "tilec compile" in err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "is not a tilec artifact" in capsys.readouterr().err


def test_output_over_a_non_artifact_directory_exits_2_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "-o", str(out), "--max-seq-len", "32"]) == 2
    assert "is not a tilec artifact" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
