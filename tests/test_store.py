"""Prompt directories: PEFT-compatible layout, round trips, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import forward as FW
from softprompt import promptdir, store
from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.training import tune as TR


def naive_logits(model, prompt, input_ids, attention_mask):
    """softprompt's reference forward: [P][x] through the whole model."""
    B, N = input_ids.shape[0], prompt.shape[0]
    x = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), FW.embed(model, input_ids)], 1)
    mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], 1)
    with torch.no_grad():
        return model(inputs_embeds=x, attention_mask=mask).logits  # (B, N+T, V)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_prompt_loads_in_peft_with_same_logits(tiny_model_dir, sp_home, toy_csv, arch, sp_store):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from softprompt import models

    lm = models.load(str(tiny_model_dir(arch)))
    res = TR.train(
        lm,
        DataConfig(path=str(toy_csv), text_column="text", limit=8, dev_fraction=0.0),
        PromptConfig(num_virtual_tokens=3),
        TrainConfig(epochs=1, batch_size=4),
        name=f"peft-{arch}", store=sp_store
    )
    assert res.path == sp_store.prompt_path(f"peft-{arch}")
    assert {p.name for p in res.path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        store.META,
    }

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(arch)), local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(res.path))
    peft_model.eval()
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default").float(), res.prompt)

    enc = lm.tokenizer(
        ["the movie was good and great", "a bad film"], padding=True, return_tensors="pt"
    )
    assert enc["attention_mask"].sum(1).tolist()[0] != enc["attention_mask"].sum(1).tolist()[1]
    with torch.no_grad():
        got = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    want = naive_logits(lm.model, res.prompt, enc["input_ids"], enc["attention_mask"])
    assert got.shape == want.shape == (2, 3 + enc["input_ids"].shape[1], len(lm.tokenizer))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # and the prompt matters: the plain model's logits on the same tokens differ
    with torch.no_grad():
        plain = lm.model(**enc).logits
    assert not torch.allclose(got[:, 3:], plain, atol=1e-4)


def test_read_prompt_dir_round_trip(tmp_path):
    emb = torch.randn(6, 16)
    meta = {"task": "toy", "verbalizer": {"0": "no"}, "seed": 3}
    path = store.save_prompt(tmp_path / "p", emb, meta, "/some/model")
    sp = store.read_prompt_dir(path)
    assert torch.equal(sp.embeddings, emb) and sp.embeddings.dtype == torch.float32
    assert sp.meta == meta and sp.name == "p" and sp.num_virtual_tokens == 6
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 6 and cfg["token_dim"] == 16
    assert cfg["base_model_name_or_path"] == "/some/model"


def test_peft_saved_adapter_reads_as_a_prompt(tiny_model_dir, tmp_path):
    """The other direction: a prompt-tuning adapter written by PEFT itself reads in softprompt."""
    pytest.importorskip("peft")
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), local_files_only=True)
    pm = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(str(tmp_path / "peft-adapter"))
    sp = store.read_prompt_dir(tmp_path / "peft-adapter")
    assert torch.equal(sp.embeddings, pm.get_prompt_embedding_to_save("default").float())
    assert sp.meta == {}


def test_store_names_and_listing(sp_home, sp_store):
    assert sp_store.list_prompts() == []
    sp_store.save_prompt(("b-2"), torch.zeros(2, 4), {})
    sp_store.save_prompt(("a.1"), torch.zeros(2, 4), {})
    assert sp_store.list_prompts() == ["a.1", "b-2"]
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129, "a..b"):
        with pytest.raises(UserError, match="invalid prompt name"):
            sp_store.prompt_path(bad)
    with pytest.raises(UserError, match="not found"):
        sp_store.load_prompt("nope")


def store_entries(root) -> tuple[list[str], list[str]]:
    """(names, leftovers): everything in the store that is neither a name, the version it points
    to, nor a lock file is a leftover."""
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    live = {(root / n).resolve().name for n in names} | {f".{n}@lock" for n in names}
    return names, sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name not in live
                         and not p.name.endswith("@lock"))


def test_overwrite_is_atomic_and_leaves_no_temporaries(sp_home, sp_store):
    path = sp_store.prompt_path("p")
    store.save_prompt(path, torch.ones(2, 4), {"v": 1})
    first = path.resolve()
    store.save_prompt(path, torch.full((3, 4), 2.0), {"v": 2})
    sp = sp_store.load_prompt("p")
    assert sp.meta == {"v": 2} and torch.equal(sp.embeddings, torch.full((3, 4), 2.0))
    assert path.is_symlink() and path.resolve() != first and not first.exists()  # a new version, the old one gone
    assert store_entries(path.parent) == (["p"], [])


def test_failed_write_keeps_the_old_prompt(sp_home, monkeypatch, sp_store):
    path = sp_store.prompt_path("p")
    store.save_prompt(path, torch.ones(2, 4), {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(promptdir, "save_file", boom)
    with pytest.raises(OSError):
        store.save_prompt(path, torch.zeros(2, 4), {"v": 2})
    sp = sp_store.load_prompt("p")
    assert sp.meta == {"v": 1} and torch.equal(sp.embeddings, torch.ones(2, 4))
    assert store_entries(path.parent) == (["p"], [])


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda p: (p / "adapter_model.safetensors").unlink(),
            "adapter_model.safetensors is missing",
        ),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LORA"}'), "LORA adapter"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage"), "unreadable"),
        (lambda p: (p / store.META).write_text("{"), "softprompt.json is not valid JSON"),
    ],
)
def test_broken_prompt_dirs_give_clear_errors(tmp_path, damage, match):
    path = store.save_prompt(tmp_path / "p", torch.ones(2, 4), {"v": 1})
    damage(path)
    with pytest.raises(UserError, match=match) as e:
        store.read_prompt_dir(path)
    assert "'p'" in str(e.value) and "\n" not in str(e.value)


def test_truncated_safetensors_is_a_user_error(tmp_path):
    path = store.save_prompt(tmp_path / "p", torch.randn(4, 8), {})
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="unreadable"):
        store.read_prompt_dir(path)


def test_check_compatible(tiny_lm):
    fp = tiny_lm.fingerprint
    ok = store.StoredPrompt(
        "ok", None, torch.zeros(2, fp["hidden_size"]), {"base_model": {"fingerprint": fp}}
    )
    store.check_compatible(ok, fp)
    unknown = store.StoredPrompt("unknown", None, torch.zeros(2, fp["hidden_size"]), {})
    store.check_compatible(unknown, fp)  # no recorded base model: nothing to compare
    other = store.StoredPrompt(
        "other",
        None,
        torch.zeros(2, fp["hidden_size"]),
        {"base_model": {"fingerprint": {**fp, "vocab_size": 7}}},
    )
    with pytest.raises(UserError, match="vocab_size"):
        store.check_compatible(other, fp)
    store.check_compatible(other, fp, force=True)
    wide = store.StoredPrompt("wide", None, torch.zeros(2, fp["hidden_size"] + 1), {})
    with pytest.raises(UserError, match="hidden size"):
        store.check_compatible(wide, fp, force=True)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    assert store.load_checkpoint(tmp_path / "ckpt") is None
    tensors = {"state.prompt": torch.randn(3, 4), "opt.0.step": torch.tensor(5.0)}
    state = {"epoch": 2, "history": [{"loss": 0.1 + 0.2}]}
    store.save_checkpoint(tmp_path / "ckpt", tensors, state)
    got_t, got_s = store.load_checkpoint(tmp_path / "ckpt")
    assert got_s == state and set(got_t) == set(tensors)
    assert all(torch.equal(got_t[k], tensors[k]) for k in tensors)
    (tmp_path / "ckpt" / "state.json").write_text("{")
    with pytest.raises(UserError, match="unreadable"):
        store.load_checkpoint(tmp_path / "ckpt")
