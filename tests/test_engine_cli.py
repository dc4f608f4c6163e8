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


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent"], "no config.json"),
    # Sampling arguments are checked before any model is read: the bad temperature is reported, not
    # the missing checkpoint.
    (["--model", "/nonexistent", "--temperature", "nan"], "temperature"),
    (["--model", "/nonexistent", "--top-k", "-4"], "top_k"),
    (["--model", "/nonexistent", "--max-tokens", "0"], "max_tokens"),
    (["--model", "/nonexistent", "--batch", "0"], "--batch"),
    (["--model", "/nonexistent", "--prompt-len", "0"], "--prompt-len"),
])
def test_generate_cli_reports_bad_input_in_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("FLASHSEEK_TRACEBACK", raising=False)
    assert main(["generate", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_generate_cli_traceback_on_request(monkeypatch):
    monkeypatch.setenv("FLASHSEEK_TRACEBACK", "1")
    from flashseek.models.deepseek.config import ConfigError
    with pytest.raises(ConfigError):
        main(["generate", "--device", "cpu", "--model", "/nonexistent"])
