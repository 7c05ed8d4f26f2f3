"""Shared fixtures: tiny models built in-process (no network, ever) and an isolated store (``store``).

``tiny_model_dir(arch)`` writes a real transformers folder (config, weights, a byte-level BPE
tokenizer trained here on a few sentences), so the same loading code as for real models runs.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from serving import running, save_prompts

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """Where the task recipes' data sets are: ``$SOFTPROMPT_DATA``, else ``../shared/data`` beside
    the repository (a fresh clone has none: the tests that need them skip)."""
    env = os.environ.get("SOFTPROMPT_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def needs_data(*folders: str):
    """Skip marker for a test that reads recipe data sets (``folders`` under the data root)."""
    root = shared_data_root()
    missing = [f for f in folders if not (root / f).is_dir()]
    return pytest.mark.skipif(bool(missing), reason=f"needs the data set(s) {', '.join(missing)} under the data "
                                                    f"root {root} ($SOFTPROMPT_DATA; docs/data.md)")


def pytest_addoption(parser):
    parser.addoption("--check-device", default=None, metavar="DEVICE",
                     help="run the tests marked cuda on DEVICE (default: cuda, skipped when torch sees no "
                          "GPU); 'cpu' runs the same checks here, as scripts/gpu_check.sh's dry run does")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where torch sees no CUDA GPU, unless
    ``--check-device`` names the device to run them on instead."""
    if config.getoption("--check-device") or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} sees none (scripts/gpu_check.sh "
                                   "runs these on one; --check-device cpu runs them on the CPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def check_device(pytestconfig) -> torch.device:
    """The device the ``cuda``-marked checks run on: ``--check-device``, else cuda."""
    return torch.device(pytestconfig.getoption("--check-device") or "cuda")


SKIP_FRAMES = ("transformers", "torch", "logging", "warnings", "functools", "contextlib", "conftest")


def _our_caller() -> str | None:
    """``module:line`` of the nearest caller outside transformers and torch, if it is softprompt
    code (a call another library makes, e.g. PEFT's, is that library's business)."""
    for frame in inspect.stack()[2:]:
        mod = frame.frame.f_globals.get("__name__", "")
        if mod.split(".")[0] in SKIP_FRAMES:
            continue
        return f"{mod}:{frame.lineno}" if mod.startswith("softprompt") else None
    return None


class _LoggedDeprecations(logging.Handler):
    """Deprecation notices that transformers logs (``logger.warning_once``)."""

    def __init__(self, hits: list[str]):
        super().__init__(logging.WARNING)
        self.hits = hits

    def emit(self, record: logging.LogRecord) -> None:
        where = _our_caller() if "deprecat" in record.getMessage().lower() else None
        if where:
            self.hits.append(f"{record.getMessage()} (called from {where})")


@pytest.fixture(autouse=True)
def _no_deprecated_transformers_calls(monkeypatch):
    """Fail a test in which our code makes a call that transformers marks deprecated, whether it
    says so through ``warnings.warn`` (attributed to torch's module call, so pyproject's
    filterwarnings on softprompt modules cannot see it) or through its logger."""
    import warnings

    import transformers  # noqa: F401 - installs Logger.warning_once

    hits: list[str] = []
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, **kw):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        where = _our_caller() if issubclass(cat, (DeprecationWarning, FutureWarning)) else None
        if where and "deprecat" in str(message).lower():
            hits.append(f"{message} (called from {where})")
        return real_warn(message, category, stacklevel + 1, **kw)

    monkeypatch.setattr(warnings, "warn", warn)
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()  # logged once per process otherwise: every test gets to see it
    root = logging.getLogger("transformers")
    level, handler = root.level, _LoggedDeprecations(hits)
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    yield
    root.removeHandler(handler)
    root.setLevel(level)
    assert not hits, "deprecated transformers usage: " + "; ".join(hits)


CORPUS = [
    "the movie was good and the actors were great",
    "the movie was bad and the plot was boring",
    "a wonderful film with a great story",
    "a terrible film with a boring story",
    "what is the capital of france",
    "who wrote the book about the sea",
    "positive negative yes no good bad",
    "I want you to act as a logistician.",
]


# ChatML, as SmolLM2-Instruct and Qwen write it (the tokenizer's own template in a real model)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    if chat:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(arch: str, vocab: int, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
        return GPT2LMHeadModel(cfg)
    if arch == "t5":
        cfg = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return T5ForConditionalGeneration(cfg)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch ('llama', 'gpt2', 't5') -> folder with a tiny random model + tokenizer;
    ``chat=True``: the tokenizer has ChatML's turn markers and template."""
    made: dict[tuple[str, bool], Path] = {}

    def make(arch: str = "llama", chat: bool = False) -> Path:
        if (arch, chat) not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}{'-chat' if chat else ''}")
            tok = build_tokenizer(out, chat)
            build_model(arch, len(tok)).save_pretrained(out)
            made[arch, chat] = out
        return made[arch, chat]

    return make


@pytest.fixture
def sp_store(tmp_path):
    """An empty store of the test's own; its data root is where the real data sets are."""
    from softprompt.store import Store

    return Store(tmp_path / "home", shared_data_root())


@pytest.fixture
def sp_home(sp_store) -> Path:
    """The root of the test's store (``sp_store.home``)."""
    return sp_store.home


@pytest.fixture
def tiny_lm(tiny_model_dir, sp_store):
    from softprompt import models

    return models.load(str(tiny_model_dir("llama")))


def write_toy_csv(p: Path, rows: int = 48, numbered: bool = False) -> Path:
    """A separable two-class toy task: 'good' rows are 1, 'bad' rows are 0 (``numbered``: each
    text ends with its row number, so no two rows are equal)."""
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            good = i % 2 == 1
            text = f"the movie was {'good and great' if good else 'bad and boring'}" + (f" {i}" if numbered else "")
            w.writerow([text, "1" if good else "0"])
    return p


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    """48 rows of the separable two-class toy task (``write_toy_csv``)."""
    return write_toy_csv(tmp_path / "toy.csv")


def write_toy_task(folder: Path, name: str, rows: list[tuple[str, str]], template: str, verbalizer: dict) -> Path:
    """A task recipe (.json) over a CSV of (text, label) rows; dev is carved from train."""
    data = folder / f"{name}.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    recipe = {"train": {"path": str(data)}, "template": template, "target_column": "label",
              "verbalizer": verbalizer, "max_length": 64, "dev_fraction": 0.25}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture
def toy_tasks(tmp_path) -> dict[str, Path]:
    """Three small classification tasks with different templates and label words."""
    mood = [(f"the film was {'good and great' if i % 2 else 'bad and boring'} {i}", str(i % 2)) for i in range(40)]
    pets = [(f"my {'cat' if i % 2 else 'dog'} sleeps {i}", str(i % 2)) for i in range(40)]
    size = [(f"a {'big' if i % 2 else 'small'} house {i}", str(i % 2)) for i in range(40)]
    return {
        "mood": write_toy_task(tmp_path, "mood", mood, "Review: {text}\nSentiment:", {"0": "negative", "1": "positive"}),
        "pets": write_toy_task(tmp_path, "pets", pets, "Text: {text}\nAnimal:", {"0": "dog", "1": "cat"}),
        "size": write_toy_task(tmp_path, "size", size, "{text}\nSize:", {"0": "small", "1": "big"}),
    }


def sharpen(lm, factor: float = 10.0):
    """Scale every weight matrix of the tiny random model: its 0.02-std init gives near-uniform
    logits that no prompt can move much; scaled, prompt tuning can actually learn a toy task."""
    from softprompt import models

    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    lm.fingerprint = models.fingerprint(lm.model)
    return lm


def interrupt_at_epoch(monkeypatch, epoch: int):
    """Make ``loop.fit`` raise KeyboardInterrupt (a Ctrl-C) when epoch ``epoch`` (0-based) starts,
    through the loop's public ``EPOCH_HOOKS``; returns a function that undoes it."""
    from softprompt.training import loop

    def stop(index: int) -> None:
        if index == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "EPOCH_HOOKS", [*loop.EPOCH_HOOKS, stop])
    return lambda: monkeypatch.setattr(loop, "EPOCH_HOOKS", [h for h in loop.EPOCH_HOOKS if h is not stop])


def with_store(store, args: list[str]) -> list[str]:
    """``args`` of a ``softprompt`` command line with ``--home`` and ``--data-root`` of ``store``
    (put after the subcommand, so flags the test gives later win)."""
    n = 2 if args[:1] == ["prompts"] else 1
    return [*args[:n], "--home", str(store.home), "--data-root", str(store.data_root), *args[n:]]


@pytest.fixture
def cli_main(sp_store):
    """``softprompt.cli.main`` on the test's store (``--home``/``--data-root``, no environment)."""
    from softprompt import cli

    return lambda args: cli.main(with_store(sp_store, list(args)))


# ---------------------------------------------------------------- threads


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (tiny ops on 2 threads are slower, and the machine is
    shared), the previous thread count restored afterwards. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def app_http(tiny_lm, sp_store):
    """A TestClient on an in-process app over ``tiny_lm`` and the test's store (prompts up to
    ``upload_helpers.MAX_N`` tokens): each test gets a fresh one."""
    from fastapi.testclient import TestClient
    from upload_helpers import MAX_N

    from softprompt.inference.engine import Engine
    from softprompt.serve.app import ServerConfig, create_app

    app = create_app(Engine(tiny_lm, store=sp_store), ServerConfig(model_id="tiny", max_prompt_tokens=MAX_N))
    with TestClient(app) as c:
        yield c


# ---------------------------------------------------------------- the server tests' store and servers
# (module-scoped: each server test module gets its own store, model and server; helpers in serving.py)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A store of the module's own (one server serves many tests)."""
    from softprompt.store import Store

    return Store(tmp_path_factory.mktemp("serve-home"))


@pytest.fixture(scope="module")
def lm(tiny_model_dir, home):
    from softprompt import models

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    return save_prompts(models.load(str(tiny_model_dir("llama"))), home)


@pytest.fixture(scope="module")
def ref(lm, home):
    """A separate engine for reference answers, one request at a time."""
    from softprompt.inference.engine import Engine

    return Engine(lm, store=home)


@pytest.fixture(scope="module")
def srv(lm, home):
    with running(lm, home) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    import httpx

    with httpx.Client(base_url=srv[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def chat_lm(tiny_model_dir, home):
    """A tiny model whose tokenizer has ChatML markers and template, with two prompts stored."""
    from softprompt import models

    pytest.importorskip("fastapi")
    clm = models.load(str(tiny_model_dir("llama", chat=True)))
    g = torch.Generator().manual_seed(3)
    for name in ("c0", "c1"):
        home.save_prompt(name, torch.randn(4, clm.hidden_size, generator=g),
                         {"base_model": {"name": clm.name, "fingerprint": clm.fingerprint}, "mode": "lm"})
    return clm


@pytest.fixture(scope="module")
def chat_srv(chat_lm, home):
    with running(chat_lm, home) as s:
        yield s


@pytest.fixture(scope="module")
def chat_ref(chat_lm, home):
    from softprompt.inference.engine import Engine

    return Engine(chat_lm, store=home)
