"""Every decoder-only architecture in ``models.ARCHITECTURES`` (docs/architectures.md), each as a
tiny random model built here from its config class, passes the same three checks:

1. the shared-prefix loss equals the naive ``[P][x]`` loss, in value and in prompt gradient;
2. our decode loop equals ``model.generate`` (greedy) with the prompt passed as ``inputs_embeds``,
   and without a prompt;
3. a stored prompt loads in PEFT and gives PEFT's logits; PEFT's own text init equals ours
   (for Gemma this checks that the prompt lives beside the sqrt(H)-scaled input embeddings).

T5 (encoder-decoder) has its own tests: tests/test_t5.py and tests/test_store.py.
"""

from __future__ import annotations

import pytest
import torch
from batches import make_batch
from conftest import build_tokenizer, sharpen
from helpers import rel

from softprompt import forward as FW
from softprompt import models, store
from softprompt.config import GenerateConfig, UserError
from softprompt.inference import engine
from softprompt.prompt import make_prompt

TOL = 1e-4
N = 4
TEXT = "the movie was good and"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def tiny_config(arch: str, vocab: int):
    """The architecture's config class with a few layers of width 64."""
    import transformers as T

    gqa = dict(SMALL, num_key_value_heads=2)
    if arch == "llama":
        return T.LlamaConfig(vocab_size=vocab, **gqa)
    if arch == "mistral":
        return T.MistralConfig(vocab_size=vocab, sliding_window=512, **gqa)
    if arch == "qwen2":
        return T.Qwen2Config(vocab_size=vocab, **gqa)
    if arch == "qwen3":
        return T.Qwen3Config(vocab_size=vocab, head_dim=16, **gqa)
    if arch == "gemma2":  # logit soft-capping on (Gemma 2's default 30.0), sliding window of 512
        return T.Gemma2Config(vocab_size=vocab, head_dim=16, sliding_window=512, query_pre_attn_scalar=16, **gqa)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=512, query_pre_attn_scalar=16,
                                  final_logit_softcapping=30.0, **gqa)
    if arch == "phi3":
        return T.Phi3Config(vocab_size=vocab, **gqa)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=vocab, **SMALL)
    if arch == "opt":
        return T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                           pad_token_id=0, eos_token_id=1, bos_token_id=1)
    raise ValueError(arch)


DECODERS = [a for a in models.ARCHITECTURES if a != "t5"]


def write_tiny(folder, arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(arch, len(tok))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    made = {}

    def make(arch: str):
        if arch not in made:
            made[arch] = write_tiny(tmp_path_factory.mktemp(f"arch-{arch}"), arch)
        return made[arch]

    return make


def test_the_table_covers_every_config_here():
    assert set(DECODERS) | {"t5"} == set(models.ARCHITECTURES)


@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_loss_and_grad_equal_naive(arch_dirs, arch):
    lm = sharpen(models.load(str(arch_dirs(arch))))
    assert lm.model.config.model_type == arch
    batch = make_batch(lm.tokenizer, "mixed")
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    runs = []
    for fn, seed in ((FW.prefix_loss, 0), (FW.naive_loss, 0), (FW.naive_loss, 1)):
        p = make_prompt(lm.model, lm.tokenizer, N, "vocab", seed=seed).requires_grad_(True)
        loss = fn(lm.model, p, *args)
        runs.append((loss.item(), torch.autograd.grad(loss, p)[0]))
    (fast, g_fast), (naive, g_naive), (other, g_other) = runs
    assert abs(fast - naive) / abs(naive) < TOL and rel(g_fast, g_naive) < TOL
    # the check can fail: another prompt gives another loss and gradient
    assert abs(other - naive) > 10 * TOL * abs(naive) and rel(g_other, g_naive) > 100 * TOL


@pytest.mark.parametrize("arch", DECODERS)
def test_decode_equals_hf_generate(arch_dirs, arch):
    # peaked distributions (see test_generate.py); Gemma's embeddings are already x sqrt(H), and
    # x10 on top saturates its logit soft-cap into one repeated token
    lm = sharpen(models.load(str(arch_dirs(arch))), 2.0 if arch.startswith("gemma") else 10.0)
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompt = make_prompt(lm.model, lm.tokenizer, N, "vocab", seed=0) * 3  # a prompt that matters
    kw = dict(do_sample=False, max_new_tokens=8, eos_token_id=lm.tokenizer.eos_token_id,
              pad_token_id=lm.tokenizer.pad_token_id)
    outs = {}
    with torch.no_grad():
        x = torch.cat([prompt, FW.embed(lm.model, torch.tensor(ids))])[None]  # (1, N+T, H)
        hf = {"prompted": lm.model.generate(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long), **kw)[0],
              "plain": lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw)[0, len(ids):]}
    for kind, p in (("prompted", prompt), ("plain", None)):
        want = hf[kind].tolist()
        if lm.tokenizer.eos_token_id in want:
            want = want[: want.index(lm.tokenizer.eos_token_id)]
        outs[kind] = engine.generate(lm, p, TEXT, GenerateConfig(max_new_tokens=8)).token_ids
        assert outs[kind] == want and want, kind
    assert outs["prompted"] != outs["plain"]  # the prompt matters


def naive_logits(model, prompt, input_ids, attention_mask):
    x = torch.cat([prompt[None].expand(input_ids.shape[0], -1, -1), FW.embed(model, input_ids)], 1)
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], prompt.shape[0]), attention_mask], 1)
    return model(inputs_embeds=x, attention_mask=mask).logits  # (B, N+T, V)


@pytest.mark.parametrize("arch", DECODERS)
def test_peft_round_trip_and_text_init(arch_dirs, arch, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = arch_dirs(arch)
    lm = models.load(str(folder))
    ours = make_prompt(lm.model, lm.tokenizer, N, "text", text="the movie was good")
    peft_init = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the movie was good", tokenizer_name_or_path=str(folder)))
    assert torch.allclose(peft_init.get_prompt_embedding_to_save("default").float(), ours, atol=1e-6)

    prompt = make_prompt(lm.model, lm.tokenizer, N, "vocab", seed=3) * 3  # a prompt that matters
    path = store.save_prompt(tmp_path / "p", prompt, {}, str(folder), lm.model.config)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(path)).eval()
    enc = lm.tokenizer(["the movie was good and great", "a bad film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        want = naive_logits(lm.model, prompt, enc["input_ids"], enc["attention_mask"])
        plain = lm.model(**enc).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[:, N:], plain, atol=1e-3)


def test_gemma_prompt_rows_are_scaled_embeddings(arch_dirs):
    """Gemma multiplies input embeddings by sqrt(H) inside its embedding module; inits must
    come out of that module, not off the raw weight."""
    lm = models.load(str(arch_dirs("gemma2")))
    ids = lm.tokenizer("the movie", add_special_tokens=False)["input_ids"]
    p = make_prompt(lm.model, lm.tokenizer, len(ids), "text", text="the movie")
    raw = lm.model.get_input_embeddings().weight[torch.tensor(ids)]
    assert torch.allclose(p, FW.embed(lm.model, torch.tensor(ids)).detach())
    assert torch.allclose(p, raw * 64 ** 0.5, rtol=1e-5) and not torch.allclose(p, raw)


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    build_tokenizer(tmp_path)
    BertForMaskedLM(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"architecture 'bert' \(BertForMaskedLM\) is not supported; supported: Llama"):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "my_remote_lm", "auto_map": {"AutoModel": "x.Y"}}')
    with pytest.raises(UserError, match="architecture 'my_remote_lm'"):
        models.load(str(tmp_path))
