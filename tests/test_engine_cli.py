"""`flashseek generate` on CPU with the embedded default model."""
import pytest

from flashseek.cli.main import main


def test_generate_cli_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHSEEK_CACHE", str(tmp_path))
    rc = main(["generate", "--device", "cpu", "--precision", "reference", "--batch", "2", "--max-tokens", "5",
               "--prompt-len", "9", "--ignore-eos", "--stream"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "tiny-r1" / "model.safetensors.index.json").exists()
    for needle in ("tokens/s", "TTFT", "TPOT", "KV cache: peak 2 of", "-> 5 tokens (length)"):
        assert needle in out, needle


def test_generate_cli_rejects_bad_combination(capsys):
    assert main(["generate", "--full-dims", "--model", "/nonexistent"]) == 2
    with pytest.raises(SystemExit):
        main(["generate", "--device", "tpu"])
