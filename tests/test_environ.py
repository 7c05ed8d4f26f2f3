"""The environment is read at one edge (``cli/environ.py``) and passed down as values: no other
module under src/ touches it, and two stores work side by side in one process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from softprompt.cli import environ
from softprompt.config import UserError
from softprompt.store import Store

SRC = Path(__file__).resolve().parents[1] / "src" / "softprompt"
EDGE = SRC / "cli" / "environ.py"
TOUCH = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def touches_environment(path: Path) -> list[str]:
    """``os.environ`` / ``os.getenv`` / ``os.putenv`` ... (attribute or imported name) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in TOUCH and isinstance(node.value, ast.Name) \
                and node.value.id == "os":
            found.append(f"{path.relative_to(SRC.parent)}:{node.lineno} os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{path.relative_to(SRC.parent)}:{node.lineno} from os import {a.name}"
                      for a in node.names if a.name in TOUCH]
    return found


def test_only_the_edge_module_touches_the_environment():
    bad = [hit for f in sorted(SRC.rglob("*.py")) if f != EDGE for hit in touches_environment(f)]
    assert not bad, "read the environment in cli/environ.py and pass the value down:\n" + "\n".join(bad)


def test_the_check_sees_each_way_of_touching_it(tmp_path):
    probe = SRC / "_probe_environ.py"  # inside the tree, so the relative path in the message works
    probe.write_text("import os\nfrom os import getenv\na = os.environ['X']\nos.putenv('Y', '1')\n")
    try:
        assert len(touches_environment(probe)) == 3
    finally:
        probe.unlink()


def test_edge_reads_flags_then_environment_then_defaults(tmp_path):
    env = environ.read({"SOFTPROMPT_HOME": str(tmp_path / "h"), "SOFTPROMPT_DATA": str(tmp_path / "d"),
                        "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1", "RANK": "1",
                        "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SOFTPROMPT_API_KEY": "k"})
    st = environ.store(env=env)
    assert (st.home, st.data_root, st.hub_cache, st.offline) == (tmp_path / "h", tmp_path / "d", tmp_path / "hf" / "hub",
                                                                  True)
    assert env.launch.launched and env.launch.local_rank == 1 and not env.launch.is_main and env.api_key == "k"
    flags = environ.store(str(tmp_path / "H"), str(tmp_path / "D"), env=env)
    assert (flags.home, flags.data_root) == (tmp_path / "H", tmp_path / "D")
    bare = environ.read({})
    assert bare.home == Path.home() / ".cache" / "softprompt" and not bare.launch.launched and not bare.offline
    assert environ.store(str(tmp_path / "H"), env=bare).data_root == tmp_path / "H" / "data"  # user-level default


def test_two_engines_on_two_stores_in_one_process_see_only_their_own(tmp_path, tiny_lm):
    from softprompt.config import GenerateConfig
    from softprompt.inference.engine import Engine, GenerateRequest

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    g = torch.Generator().manual_seed(0)
    meta = {"base_model": {"name": tiny_lm.name, "fingerprint": tiny_lm.fingerprint}}
    pa, pb = (torch.randn(4, tiny_lm.hidden_size, generator=g) for _ in range(2))
    a.save_prompt("only-a", pa, meta)
    b.save_prompt("only-b", pb, meta)
    b.save_prompt("both", pb, meta)
    a.save_prompt("both", pa, meta)
    assert (a.list_prompts(), b.list_prompts()) == (["both", "only-a"], ["both", "only-b"])
    ea, eb = Engine(tiny_lm, store=a), Engine(tiny_lm, store=b)
    cfg = GenerateConfig(max_new_tokens=1)

    def logits(eng, name):
        return eng.generate([GenerateRequest("the movie", name, cfg)], return_logits=True)[0].logits[0]

    assert not torch.equal(logits(ea, "only-a"), logits(ea, None))  # the prompt changes the answer
    assert torch.equal(logits(ea, "both"), logits(ea, "only-a"))  # "both" in A is A's tensor
    assert torch.equal(logits(eb, "both"), logits(eb, "only-b"))  # and in B, B's
    assert not torch.equal(logits(ea, "both"), logits(eb, "both"))
    for eng, foreign in ((ea, "only-b"), (eb, "only-a")):
        with pytest.raises(UserError, match="not found"):
            logits(eng, foreign)
    with pytest.raises(UserError, match="not found"):
        b.load_prompt("only-a")


def test_an_engine_without_a_store_serves_only_prompts_added_in_memory(tiny_lm):
    from softprompt.config import GenerateConfig
    from softprompt.inference.engine import Engine, GenerateRequest

    eng = Engine(tiny_lm)
    eng.add_prompt("mem", torch.randn(3, tiny_lm.hidden_size))
    assert eng.generate([GenerateRequest("x", "mem", GenerateConfig(max_new_tokens=1))])
    with pytest.raises(UserError, match="no store"):
        eng.generate([GenerateRequest("x", "elsewhere", GenerateConfig(max_new_tokens=1))])


def test_a_store_pickles_and_compares_by_value(tmp_path):
    import pickle

    st = Store(tmp_path / "h", tmp_path / "d", hub_cache=tmp_path / "hub", offline=True)
    assert pickle.loads(pickle.dumps(st)) == st
    assert st.models == tmp_path / "h" / "models" and st.run_dir("r") == tmp_path / "h" / "runs" / "r"
