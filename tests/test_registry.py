"""The prompt registry: list/show/rm/export/import, PEFT adapters, fingerprints and broken files.

Every bad input must give one clear line (exit 2 from the CLI, ``UserError`` from the library)
and leave the registry usable for the other prompts.
"""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import models, store
from softprompt.config import GenerateConfig, UserError
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the movie was"


def save(st, lm, name: str, n: int = 4, seed: int = 0, fingerprint: dict | None = None, **meta) -> torch.Tensor:
    emb = torch.randn(n, lm.hidden_size, generator=torch.Generator().manual_seed(seed))
    meta = {"base_model": {"name": lm.name, "fingerprint": fingerprint or lm.fingerprint}, **meta}
    st.save_prompt((name), emb, meta, str(lm.path), lm.model.config)
    return emb


def run_cli(capsys, main, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def first_logits(st, lm, name: str | None, force: bool = False) -> torch.Tensor:
    eng = Engine(lm, EngineConfig(force=force), store=st)
    return eng.generate([GenerateRequest(TEXT, name, GenerateConfig(max_new_tokens=1))], return_logits=True)[0].logits[0]


def test_list_show_rm(tiny_lm, capsys, cli_main, sp_store):
    save(sp_store, tiny_lm, "alpha", task="toy", template="Review: {text}")
    save(sp_store, tiny_lm, "beta", n=6, seed=1)
    code, out, _ = run_cli(capsys, cli_main, "prompts", "list")
    assert code == 0 and "alpha" in out and "N=6" in out and "task=toy" in out
    code, out, _ = run_cli(capsys, cli_main, "prompts", "show", "alpha")
    info = json.loads(out)
    assert info["status"] == "ok" and info["num_virtual_tokens"] == 4 and info["fingerprint"] == tiny_lm.fingerprint
    assert run_cli(capsys, cli_main, "prompts", "rm", "alpha")[0] == 0
    assert sp_store.list_prompts() == ["beta"]
    code, _, err = run_cli(capsys, cli_main, "prompts", "rm", "alpha")
    assert code == 2 and err.count("\n") == 1 and "not found" in err


def test_export_import_roundtrip_and_peft_loads_our_export(tiny_lm, tmp_path, capsys, cli_main, sp_store):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save(sp_store, tiny_lm, "alpha", n=5, task="toy")
    ours = first_logits(sp_store, tiny_lm, "alpha")
    dest = tmp_path / "exported"
    assert run_cli(capsys, cli_main, "prompts", "export", "alpha", str(dest))[0] == 0
    assert run_cli(capsys, cli_main, "prompts", "export", "alpha", str(dest))[0] == 2  # never overwrites
    assert run_cli(capsys, cli_main, "prompts", "import", str(dest), "--name", "alpha2")[0] == 0
    assert sp_store.load_prompt("alpha2").meta["task"] == "toy"
    torch.testing.assert_close(first_logits(sp_store, tiny_lm, "alpha2"), ours, atol=1e-6, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm.path)
    peft_model = PeftModel.from_pretrained(base, str(dest)).eval()
    ids = torch.tensor([tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def make_peft_prompt(path, tiny_model_dir, n: int = 5):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    with torch.no_grad():  # "trained": move it away from its init
        w = pm.prompt_encoder["default"].embedding.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    pm.save_pretrained(path)
    return pm.eval()


def test_imported_peft_prompt_gives_peft_logits(tiny_lm, tiny_model_dir, tmp_path, capsys, cli_main, sp_store):
    pm = make_peft_prompt(tmp_path / "peft-sst", tiny_model_dir)
    assert not (tmp_path / "peft-sst" / store.META).exists()
    code, out, _ = run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "peft-sst"))
    assert code == 0 and "peft-sst" in out
    meta = sp_store.load_prompt("peft-sst").meta
    assert meta["base_model"]["fingerprint"] is None and meta["source"] == "peft"
    ids = torch.tensor([tiny_lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits[0, -1]
        peft_tokens = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False, pad_token_id=0, eos_token_id=1)[0, ids.shape[1]:].tolist()
    torch.testing.assert_close(first_logits(sp_store, tiny_lm, "peft-sst"), theirs, atol=1e-5, rtol=0)
    eng = Engine(tiny_lm, store=sp_store)
    ours = eng.generate([GenerateRequest(TEXT, "peft-sst", GenerateConfig(max_new_tokens=4))])[0].token_ids
    assert ours == peft_tokens[: len(ours)]
    # with --model the fingerprint is recorded (and so checked later)
    code, _, _ = run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "peft-sst"), "--name", "peft2", "--model",
                         str(tiny_lm.path))
    assert code == 0 and sp_store.load_prompt("peft2").meta["base_model"]["fingerprint"] == tiny_lm.fingerprint


def test_fingerprint_mismatch_is_refused_unless_forced(tiny_lm, tiny_model_dir, capsys, cli_main, sp_store):
    other = dict(tiny_lm.fingerprint, embedding_sha256="0" * 16)
    save(sp_store, tiny_lm, "foreign", fingerprint=other)
    with pytest.raises(UserError, match="another base model.*--force"):
        first_logits(sp_store, tiny_lm, "foreign")
    assert first_logits(sp_store, tiny_lm, "foreign", force=True).shape[0] == tiny_lm.model.config.vocab_size
    code, _, err = run_cli(capsys, cli_main, "generate", "--model", str(tiny_lm.path), "--prompt", "foreign", TEXT)
    assert code == 2 and "another base model" in err
    t5 = models.load(str(tiny_model_dir("t5")))  # same H (64) but another model: refused, forced ok
    with pytest.raises(UserError, match="another base model"):
        first_logits(sp_store, t5, "foreign")
    sp_store.save_prompt(("wide"), torch.zeros(3, 32), {})
    with pytest.raises(UserError, match="hidden size 32"):
        first_logits(sp_store, tiny_lm, "wide", force=True)


def test_broken_prompts_are_reported_and_the_rest_keeps_working(tiny_lm, capsys, cli_main, sp_store):
    save(sp_store, tiny_lm, "good")
    save(sp_store, tiny_lm, "trunc", seed=1)
    save(sp_store, tiny_lm, "badjson", seed=2)
    st = sp_store.prompt_path("trunc") / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:40])
    (sp_store.prompt_path("badjson") / "adapter_config.json").write_text("{not json")
    code, out, _ = run_cli(capsys, cli_main, "prompts", "list")
    assert code == 0 and "good " in out
    assert "trunc" in out and "INVALID" in out and "adapter_model.safetensors" in out
    assert "badjson" in out and "not valid JSON" in out
    eng = Engine(tiny_lm, store=sp_store)
    cfg = GenerateConfig(max_new_tokens=2)
    with pytest.raises(UserError, match="adapter_model.safetensors.*(corrupted|truncated)"):
        eng.generate([GenerateRequest(TEXT, "good", cfg), GenerateRequest(TEXT, "trunc", cfg)])
    with pytest.raises(UserError, match="adapter_config.json"):
        eng.generate([GenerateRequest(TEXT, "badjson", cfg)])
    assert len(eng.generate([GenerateRequest(TEXT, "good", cfg)])) == 1  # the registry still works
    code, _, err = run_cli(capsys, cli_main, "generate", "--model", str(tiny_lm.path), "--prompt", "trunc", TEXT)
    assert code == 2 and err.count("\n") == 1 and "trunc" in err
    assert run_cli(capsys, cli_main, "prompts", "rm", "trunc")[0] == 0  # broken prompts can be removed
    assert "trunc" not in run_cli(capsys, cli_main, "prompts", "list")[1]


@pytest.mark.parametrize("argv, message", [
    (["prompts", "rm", "../escape"], "invalid prompt name"),
    (["prompts", "show", "a/b"], "invalid prompt name"),
    (["prompts", "export", "nope", "out"], "not found"),
    (["prompts", "import", "/no/such/dir"], "not found"),
])
def test_bad_registry_input_is_one_line_exit_2(sp_home, capsys, argv, message, cli_main):
    code, out, err = run_cli(capsys, cli_main, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_import_refuses_other_adapters_bad_names_and_existing(tiny_lm, tiny_model_dir, tmp_path, capsys, cli_main, sp_store):
    make_peft_prompt(tmp_path / "p", tiny_model_dir)
    assert run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "p"), "--name", "bad name")[0] == 2
    assert run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "p"))[0] == 0
    code, _, err = run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "p"))
    assert code == 2 and "already exists" in err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="LORA")))
    code, _, err = run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "p"), "--name", "lora")
    assert code == 2 and "LORA" in err
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(cfg, num_transformer_submodules=2)))
    code, _, err = run_cli(capsys, cli_main, "prompts", "import", str(tmp_path / "p"), "--name", "two")
    assert code == 2 and "not supported" in err
    assert sp_store.list_prompts() == ["p"]
