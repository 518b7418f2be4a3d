"""Offline and safe by default: local models, corpora and sweeps never touch
the network; hub ids fail fast offline; ``trust_remote_code`` is off unless
asked for; loading a GGUF file or a results file never runs code from it."""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rope_ntk
from rope_ntk import ModelLoadError
from rope_ntk.evaluation.results import ResultsStore
from rope_ntk.evaluation.sweep import SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parent.parent

# Installed into a subprocess through PYTHONPATH: every outgoing connection or name lookup
# is refused and written to $NETWORK_LOG, so the test sees attempts even if they are caught.
SITECUSTOMIZE = '''
import os, socket

def _refuse(what):
    def refuse(*args, **kwargs):
        with open(os.environ["NETWORK_LOG"], "a") as log:
            log.write(f"{what} {args[1:] if what.startswith('socket.') else args}\\n")
        raise OSError(f"network blocked by the test: {what}")
    return refuse

socket.socket.connect = _refuse("socket.connect")
socket.socket.connect_ex = _refuse("socket.connect_ex")
socket.getaddrinfo = _refuse("getaddrinfo")
socket.create_connection = _refuse("create_connection")
'''


@pytest.fixture
def no_network(monkeypatch):
    """Refuse and record every connection and name lookup of this process."""
    attempts: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(f"{what} {args!r}")
            raise OSError(f"network blocked by the test: {what}")

        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def test_local_model_corpus_sweep_and_verify_touch_no_network(tiny_assets, tmp_path, no_network):
    model_dir, corpus = tiny_assets
    model, tokenizer = rope_ntk.load_model(str(model_dir))
    rope_ntk.patch(model, "yarn", factor=2)
    rope_ntk.verify(model)
    assert rope_ntk.load_corpus(str(corpus))
    config = SweepConfig(model=str(model_dir), corpus=str(corpus), methods=("none", "dynamic-ntk"), lengths=(128,),
                         ppl_tokens=128, depths=(0.5,), dtype="float32")
    run_sweep(config, tmp_path / "out", plot=True)
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["records"]) == 4
    assert no_network == []


def test_hub_ids_fail_fast_offline(no_network):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"model='no-such-org/no-such-model'"):
        rope_ntk.load_model("no-such-org/no-such-model")
    with pytest.raises(rope_ntk.CorpusError, match=r"corpus='no-such-org/no-such-corpus'"):
        rope_ntk.load_corpus("no-such-org/no-such-corpus")
    assert time.monotonic() - started < 30
    assert no_network == []


def test_hub_id_without_network_fails_fast_when_not_offline(no_network, monkeypatch):
    """Not marked offline, the host lookup fails at once (no minutes of retries) and says what to do."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        rope_ntk.load_model("no-such-org/no-such-model")
    assert "cannot be reached" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    assert time.monotonic() - started < 10
    assert [a.split()[0] for a in no_network] == ["getaddrinfo"]  # the lookup, nothing more


def test_the_command_line_offline_with_sockets_blocked(tiny_assets, tmp_path):
    """The eval script as a user runs it, in a process whose sockets are blocked from startup."""
    model_dir, corpus = tiny_assets
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NETWORK_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--corpus", str(corpus), "--methods", "none,yarn", "--lengths", "128",
            "--ppl-tokens", "128", "--depths", "0.5", "--dtype", "float32", "--out", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "sweep.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.json").is_file() and (out / "perplexity_vs_length.png").is_file()
    assert not log.exists(), log.read_text()
    # the blocker works: the same interpreter setup logs a lookup that is attempted
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('example.org', 443)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and log.read_text().startswith("getaddrinfo")


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_off_by_default():
    from rope_ntk.cli import build_parser, config_from_args

    assert inspect.signature(rope_ntk.load_model).parameters["trust_remote_code"].default is False
    assert SweepConfig().trust_remote_code is False
    parser = build_parser("test", ("perplexity",))
    assert config_from_args(parser.parse_args([])).trust_remote_code is False
    assert config_from_args(parser.parse_args(["--trust-remote-code"])).trust_remote_code is True


def test_a_model_shipping_code_is_refused_and_its_code_never_runs(tiny_assets, tmp_path, no_network):
    """A model folder whose config maps to its own Python file: without trust_remote_code
    the load fails with ModelLoadError, and the file (which would leave a marker) never ran."""
    model_dir, _ = tiny_assets
    evil = tmp_path / "evil"
    evil.mkdir()
    for source in model_dir.iterdir():
        if source.name != "config.json":
            (evil / source.name).symlink_to(source)
    marker = tmp_path / "code-ran"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    code += "from transformers import LlamaConfig, LlamaForCausalLM\n"
    code += "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    code += "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    (evil / "evil_code.py").write_text(code)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilForCausalLM"})
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"trust_remote_code"):
        rope_ntk.load_model(str(evil))
    assert not marker.exists()


# ---------------------------------------------------------------- files are data, never code

PAYLOADS = [
    "__import__('os').system('touch {marker}')",
    "{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
    "!!python/object/apply:os.system ['touch {marker}']",
    "cos\nsystem\n(S'touch {marker}'\ntR.",  # a pickle protocol-0 payload, as text
]


def test_a_results_file_with_payload_strings_is_only_data(tmp_path):
    from rope_ntk.evaluation.report import write_report

    marker = tmp_path / "pwned"
    strings = [p.format(marker=marker) for p in PAYLOADS]
    records = []
    for i, text in enumerate(strings):
        cell = {"method": "none", "length": 128 + i, "metric": "perplexity", "note": text}
        records.append({**cell, "cell": cell, "value": 3.0, "command": text, "params": {}, "factor": None})
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"schema": 1, "records": records}))
    store = ResultsStore(out / "results.json")
    assert [r["note"] for r in store.records] == strings  # read back verbatim
    write_report(store.records, out, with_plot=False)
    assert "| none |" in (out / "report.md").read_text()
    assert not marker.exists()


def test_a_gguf_with_payload_metadata_runs_nothing(tmp_path):
    import gguf
    import numpy as np

    marker = tmp_path / "pwned"
    path = tmp_path / "payload.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(PAYLOADS[0].format(marker=marker))
    writer.add_chat_template(PAYLOADS[1].format(marker=marker))
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="payload.gguf"):
        rope_ntk.load_model(str(path))
    assert not marker.exists()


# pickle-based or code-running readers, and remote code switched on in the library
UNSAFE = [
    (re.compile(r"\bpickle\b|\bdill\b|\bmarshal\.loads?\b|\bshelve\b"), "pickle-like deserialization"),
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load"), "yaml.load without SafeLoader"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code switched on"),
]


def test_no_code_running_readers_in_the_library_or_scripts():
    files = [p for folder in ("rope_ntk", "eval", "scripts") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 10
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in UNSAFE:
                if pattern.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert found == [], "\n".join(found)
    # the checker itself finds what it looks for
    assert all(p.search(s) for (p, _), s in zip(UNSAFE, [
        "import pickle", "torch.load(path)", "eval(text)", "yaml.load(text)", "trust_remote_code = True"]))
    assert not UNSAFE[1][0].search("torch.load(path, weights_only=True)")
    assert not UNSAFE[2][0].search("model.eval()")
