"""The command line reports a user's mistake as one line on stderr with exit status 2.

The console script runs as a subprocess for the mistakes found after argument parsing (a
missing model, an HF folder without a tokenizer, a sampling value out of range); all of them
start at once, since each spends seconds importing jax. Flag values that argparse refuses
are checked in-process through `main`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints import CheckpointError
from checkpoints.validate import expected_shapes
from engine import loading
from serving.cli import main
from tests.console import JAXFIRE, cpu_env

_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 16,
}


def hf_folder_without_tokenizer(folder: Path) -> Path:
    """A valid tiny Llama HF folder (config.json + model.safetensors), no tokenizer files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_CONFIG))
    tensors = {n: np.zeros(s, np.float32) for n, s in expected_shapes(_CONFIG).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """case -> (exit status, stderr, the command's tmp folder), all run concurrently."""
    tmp = tmp_path_factory.mktemp("cli")
    missing = str(tmp / "no-such-model")
    no_tokenizer = hf_folder_without_tokenizer(tmp / "hf")
    cases = {
        "serve missing model": ["serve", "--model", missing],
        "generate missing model": ["generate", "--model", missing, "hi"],
        "convert without tokenizer": ["convert", str(no_tokenizer), str(tmp / "out" / "model")],
        "generate bad temperature": ["generate", "--model", missing, "--temperature", "3", "hi"],
        "serve bad flag": ["serve", "--max-top-logprobs", "21"],
        "generate mesh too big": [
            "generate",
            "--tensor-parallel",
            "2",
            "--data-parallel",
            "2",
            "hi",
        ],
    }
    procs = {
        case: subprocess.Popen(
            [str(JAXFIRE), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cpu_env()
        )
        for case, argv in cases.items()
    }
    results = {}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, err.decode(), tmp)
    return results


@pytest.mark.parametrize(
    "case, problem",
    [
        ("serve missing model", "no-such-model' is neither a registered model"),
        ("generate missing model", "no-such-model' is neither a registered model"),
        ("convert without tokenizer", "hf: no tokenizer files"),
        ("generate bad temperature", "temperature must be between 0 and 2: 3.0"),
        ("generate mesh too big", "tensor parallel 2 needs 4 devices; 1 cpu device(s) here"),
    ],
)
def test_a_user_error_is_one_line_and_exit_status_2(runs, case, problem):
    status, stderr, _ = runs[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert len(lines) == 1, stderr
    command = case.split()[0]
    assert lines[0].startswith(f"jaxfire {command}: error: ") and problem in lines[0]


def test_the_console_script_refuses_a_bad_flag_naming_it(runs):
    status, stderr, _ = runs["serve bad flag"]
    assert status == 2
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "jaxfire serve: error: argument --max-top-logprobs: must be between 0 and 20: 21"
    )


def test_convert_checks_the_tokenizer_before_writing_anything(runs):
    _, _, tmp = runs["convert without tokenizer"]
    assert not (tmp / "out").exists()


def test_convert_checks_the_tokenizer_before_reading_a_tensor(tmp_path, monkeypatch):
    def converted(*args, **kwargs):
        raise AssertionError("tensors were converted before the tokenizer was checked")

    monkeypatch.setattr(loading, "lazy_params_from_hf", converted)
    src = hf_folder_without_tokenizer(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        loading.convert(str(src), tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve", "--max-top-logprobs", "-1"], "--max-top-logprobs"),
        (["serve", "--max-slots", "0"], "--max-seqs/--max-slots"),
        (["serve", "--max-seqs", "0"], "--max-seqs/--max-slots"),
        (["serve", "--kv-cache-memory", "4 gallons"], "--kv-cache-memory"),
        (["serve", "--kv-cache-memory", "0"], "--kv-cache-memory"),
        (["serve", "--page-size", "0"], "--page-size"),
        (["serve", "--kv-cache-dtype", "float8"], "--kv-cache-dtype"),
        (["serve", "--max-len", "0"], "--max-len"),
        (["serve", "--decode-steps", "0"], "--decode-steps"),
        (["serve", "--prefill-budget", "0"], "--prefill-budget"),
        (["serve", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens/--prefill-chunk"),
        (["serve", "--prefill-chunk", "0"], "--max-num-batched-tokens/--prefill-chunk"),
        (["serve", "--port", "65536"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--max-body-bytes", "-1"], "--max-body-bytes"),
        (["serve", "--max-slots", "two"], "--max-seqs/--max-slots"),
        (["serve", "--log-level", "loud"], "--log-level"),
        (["generate", "--max-tokens", "-1", "hi"], "--max-tokens"),
        (["generate", "--max-slots", "0", "hi"], "--max-seqs/--max-slots"),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxfire {argv[0]}: error: argument {flag}: ")


def test_the_bounds_themselves_are_accepted(monkeypatch):
    ran = []
    monkeypatch.setattr("serving.cli.cmd_serve", ran.append)
    monkeypatch.setattr("serving.cli._configure_logging", lambda level: None)
    main(["serve", "--max-top-logprobs", "20", "--port", "65535", "--max-body-bytes", "1"])
    [args] = ran
    assert (args.max_top_logprobs, args.port, args.max_body_bytes) == (20, 65535, 1)


def test_the_coordinator_flags_need_distributed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--coordinator", "10.0.0.1:9876", "--process-id", "1"])
    assert exit_.value.code == 2
    assert "need --distributed" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-num-batched-tokens", "--prefill-chunk"])
def test_the_token_budget_keeps_its_old_name(monkeypatch, flag):
    ran = []
    monkeypatch.setattr("serving.cli.cmd_serve", ran.append)
    monkeypatch.setattr("serving.cli._configure_logging", lambda level: None)
    main(["serve", flag, "128"])
    assert ran[0].max_num_batched_tokens == 128


def test_generate_on_a_mesh_from_the_flags_equals_one_device():
    """--data-parallel 2 --tensor-parallel 2 on 4 simulated devices: the same greedy text as
    one device (tests/test_engine_mesh holds meshes to single-device tokens in detail)."""

    def generate(devices: int, *flags: str) -> str:
        argv = ["generate", "--max-tokens", "12", "--max-len", "256", *flags, "The sea is"]
        done = subprocess.run(
            [str(JAXFIRE), *argv], capture_output=True, text=True, env=cpu_env(devices), timeout=600
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    meshed = generate(4, "--data-parallel", "2", "--tensor-parallel", "2")
    assert meshed.strip() and meshed == generate(1)
