"""The core commands: ``train``, ``generate``, ``quickstart``, ``eval``, ``prompts``, ``serve``.

Each command parses, builds configs from the flags (``flags.py``: defaults live in the config
dataclasses), calls ONE library function and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from softprompt.cli import environ
from softprompt.cli.flags import (
    EVAL_DATA,
    add_data_flags,
    add_data_root_flag,
    add_device_flags,
    add_flags,
    add_model_flags,
    add_prompt_train_flags,
    data_config,
    data_given,
    from_args,
    given,
)
from softprompt.config import (
    TRAIN_KIND,
    DataConfig,
    EngineConfig,
    EvalConfig,
    GenerateConfig,
    PromptConfig,
    ServerConfig,
    TrainConfig,
    UserError,
)

# ---------------------------------------------------------------- train

TRAIN_DATA = ("path", "eval_path", "text_column", "template", "target_column", "verbalizer", "limit",
              "eval_limit", "max_length", "data_split", "eval_split", "data_config", "chat", "system")
# train's held-out data is its dev set: these DataConfig fields are --dev-* (they were --eval-*)
TRAIN_DEV_FLAGS = {"eval_path": "dev-data", "eval_limit": "dev-limit", "eval_split": "dev-split"}
TRAIN_FIELDS = ("lr", "epochs", "steps", "batch_size", "grad_accum", "seed", "patience", "warmup_ratio", "weight_decay",
                "precision", "pack", "warmup_steps", "schedule", "group_lr")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a soft prompt (several processes: torchrun -m softprompt train ...)")
    add_model_flags(t)
    add_device_flags(t)
    add_data_flags(t, TRAIN_DATA, helps={"path": "training file: .csv, .tsv, .jsonl or '<label> <text>' lines",
                                         "eval_path": "dev data, read as --data is: scored after each epoch for early "
                                                      "stopping and the kept epoch; not given: carved from --data",
                                         "eval_limit": "keep only the first K dev rows"},
                   rename=TRAIN_DEV_FLAGS, old={k: "eval-" + v[4:] for k, v in TRAIN_DEV_FLAGS.items()})
    t.add_argument("--name", help="name of the prompt in the store (default: task or data file name)")
    add_prompt_train_flags(t, TRAIN_FIELDS, defaults={"kind": TRAIN_KIND})
    g = t.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint of --name")
    g.add_argument("--force", action="store_true", help="accept a prompt:NAME init from another base model")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the frozen model's layers over the processes (FSDP)")
    t.set_defaults(func=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    from softprompt.cli.flags import prompt_train_configs
    from softprompt.training import distributed
    from softprompt.training.loop import StopReason
    from softprompt.training.tune import train

    launch = a.env.launch
    if not launch.is_main:  # one rank of torchrun / accelerate launch: rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
        a.quiet = True
    dcfg = data_config(a)
    pcfg, tcfg = prompt_train_configs(a)
    yours = set(given(PromptConfig, a)) | set(given(TrainConfig, a))  # --kind auto keeps these
    name = a.name or (a.task if a.task else os.path.splitext(os.path.basename(a.path))[0])
    lm = load_model(a)
    try:
        res = train(lm, dcfg, pcfg, tcfg, name=name, task=a.task, resume=a.resume, progress=not a.quiet,
                    force=a.force, fsdp=a.fsdp, store=a.store, launch=launch, given=yours, say=print)
    finally:
        distributed.teardown()
    if launch.is_main:
        print_summary(res)
    return 1 if res.stopped is StopReason.NON_FINITE else 0


def load_model(a: argparse.Namespace, name: str | None = None):
    """The command's model (``--model`` or ``name``) through its Store, on its device."""
    from softprompt import models

    return models.load(name or a.model, getattr(a, "dtype", None), getattr(a, "device", None), store=a.store,
                       local_rank=a.env.launch.local_rank)


def print_summary(res) -> None:
    print(f"\nprompt      {res.name}  ({res.prompt.shape[0]} x {res.prompt.shape[1]}, {res.prompt.numel():,} trainable parameters)")
    print(f"data        {res.n_train} training rows, {res.n_eval} evaluation rows")
    print(f"training    {len(res.history)} steps in {res.train_time_s:.1f}s, {res.stopped}")
    prec = res.meta.get("precision")
    if prec:
        logits = f"; loss logits {prec['logits']}" if prec["used"] == "bf16" and "logits" in prec else ""
        print(f"precision   {prec['used']} (asked {prec['requested']}: {prec['reason']}){logits}")
    for e in res.epochs:
        extra = "".join(f"  {k[5:]} {v:.4f}" for k, v in e.items() if k.startswith("eval_") and k != "eval_score")
        print(f"  epoch {e['epoch']:>3}  train loss {e['train_loss']:.4f}{extra}")
    if res.best:
        print("kept        the best epoch on the evaluation set")
    if res.path:
        print(f"saved       {res.path}")


# ---------------------------------------------------------------- generate, quickstart


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a stored prompt or the plain model")
    add_model_flags(g)
    g.add_argument("--prompt", help="name of a stored prompt (default: the plain model)")
    g.add_argument("--force", action="store_true", help="use a prompt trained on another base model")
    add_device_flags(g, auto_dtype=True)
    add_flags(g, GenerateConfig)
    add_flags(g, DataConfig, only=CHAT_FIELDS, helps={
        "chat": "the text is a user turn in the model's chat template (not given: as the prompt was trained)"})
    g.add_argument("text", help="the input text")
    g.set_defaults(func=cmd_generate)


CHAT_FIELDS = ("chat", "system")


def cmd_generate(a: argparse.Namespace) -> int:
    from softprompt import chat
    from softprompt.inference import engine
    from softprompt.store import check_compatible

    cfg = from_args(GenerateConfig, a)
    lm = load_model(a)
    prompt, meta, sides = None, {}, None
    if a.prompt:
        sp = a.store.load_prompt(a.prompt)
        check_compatible(sp, lm.fingerprint, force=a.force, kv_shape=lm.kv_shape)
        prompt, meta, sides = sp.tensor, sp.meta, {"offset": sp.offset, "memory": sp.memory}
    form = {"chat": bool(meta.get("chat")), "system": meta.get("system")} | given(DataConfig, a, CHAT_FIELDS)
    ids = None
    if form["chat"]:
        ids = chat.encode_chat(lm.tokenizer, chat.messages_for(a.text, form["system"]))
    elif a.system is not None:
        raise UserError("--system needs --chat")
    print(engine.generate(lm, prompt, a.text, cfg, token_ids=ids, sides=sides).text)
    return 0


def add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quickstart", help="the walk-through: base vs tuned generation on the default model")
    add_data_root_flag(q)
    q.add_argument("--skip-recommended", action="store_true", help="skip the second run with recommended settings")
    q.set_defaults(func=cmd_quickstart)


def cmd_quickstart(a: argparse.Namespace) -> int:
    from softprompt.cli.quickstart import run

    run(a.store, print_fn=print, recommended=not a.skip_recommended)
    return 0


# ---------------------------------------------------------------- eval



def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate the plain model, a prompt or an ensemble (last line: JSON)")
    add_model_flags(ev)
    add_device_flags(ev, auto_dtype=True)
    add_flags(ev, EvalConfig, skip=("task",), rename={"prompts": "prompt"}, old={"max_batch_rows": "batch-size"},
              helps={"prompts": "stored prompt name, or a,b,c for an ensemble; not given: the plain model"})
    add_data_flags(ev, EVAL_DATA, helps={"template": "input template (not given: the prompt's stored one, then the task's)",
                                         "data_split": "a datasets data set as --data: the split to evaluate "
                                                       "(test when not given, else validation)",
                                         "path": "evaluation file: .csv, .tsv, .jsonl or '<label> <text>' lines"})
    ev.add_argument("--force", action="store_true", help="use prompts trained on another base model (same hidden size)")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> int:
    from softprompt import evaluate
    from softprompt.inference import engine
    from softprompt.store import check_name

    ecfg = from_args(EvalConfig, a, task=a.task)
    for p in ecfg.prompts:
        check_name(p)
    overrides = {k: None for k in EVAL_DATA} | data_given(a, EVAL_DATA)
    if not a.task and not a.path:
        raise UserError("give --data PATH or --task NAME to evaluate on")
    lm = load_model(a)
    eng = engine.Engine(lm, EngineConfig(force=a.force, max_batch_rows=ecfg.max_batch_rows), a.store)
    print_eval(evaluate.evaluate(eng, ecfg, overrides))
    return 0


def print_eval(res: dict) -> None:
    print(f"evaluated   {', '.join(res['prompts'])} on {res['data']} ({res['n']} examples, {res['seconds']}s, "
          f"model in {res['dtype']})")
    for key in ("accuracy", "exact_match", "loss", "perplexity"):
        if key in res:
            print(f"{key:<11} {res[key]:.4f}")
    if "confusion" in res:
        print("confusion   rows = gold, columns = predicted: " + ", ".join(res["labels"]))
        for label, row in zip(res["labels"], res["confusion"]):
            print(f"  {label:>10} " + " ".join(f"{v:6d}" for v in row))
    ens = res.get("ensemble")
    if ens:
        members = ", ".join(f"{k} {v:.4f}" for k, v in ens["members"].items())
        print(f"ensemble    mean probability {ens['mean_probability']['accuracy']:.4f}, "
              f"majority vote {ens['majority_vote']['accuracy']:.4f} (members: {members})")
    print(json.dumps(res, sort_keys=True))


# ---------------------------------------------------------------- the prompt registry


def add_prompts_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("prompts", help="the prompt registry: list | show | rm | export | import")
    acts = r.add_subparsers(dest="action", required=True)
    acts.add_parser("list", help="stored prompts (broken ones are marked, not fatal)")
    for act, text in (("show", "one prompt's metadata"), ("rm", "delete a stored prompt")):
        acts.add_parser(act, help=text).add_argument("name")
    e = acts.add_parser("export", help="copy a prompt to a directory (a PEFT prompt-tuning adapter)")
    e.add_argument("name")
    e.add_argument("dir")
    i = acts.add_parser("import", help="add a prompt directory (ours or a PEFT prompt-tuning adapter)")
    i.add_argument("dir")
    i.add_argument("--name", help="name in the store (default: the directory's name)")
    i.add_argument("--model", help="base model it was trained on: its fingerprint is recorded and checked")
    r.set_defaults(func=cmd_prompts)


def cmd_prompts(a: argparse.Namespace) -> int:
    from softprompt.store import check_name

    store = a.store
    if a.action == "list":
        _list_prompts(store)
    elif a.action == "show":
        check_name(a.name)
        if not store.prompt_path(a.name).is_dir():
            raise UserError(f"prompt {a.name!r} not found ({store.prompt_path(a.name)})")
        print(json.dumps(store.prompt_summary(a.name), indent=2, sort_keys=True))
    elif a.action == "rm":
        print(f"removed {store.remove_prompt(a.name)}")
    elif a.action == "export":
        print(f"exported {a.name} to {store.export_prompt(a.name, a.dir)}")
    elif a.action == "import":
        fp, model_name, kv_shape = None, None, None
        if a.model:
            lm = load_model(a)
            fp, model_name, kv_shape = lm.fingerprint, lm.name, lm.kv_shape
        sp = store.import_prompt(a.dir, name=a.name, fingerprint=fp, model_name=model_name, kv_shape=kv_shape)
        print(f"imported {sp.name} ({sp.kind}, {' x '.join(map(str, sp.tensor.shape))}) into {sp.path}")
    return 0


def _list_prompts(store) -> None:
    names = store.list_prompts()
    if not names:
        print(f"no prompts in {store.prompts_dir()}")
    for name in names:
        s = store.prompt_summary(name)
        if s["status"] != "ok":
            print(f"{name:<28} INVALID  {s['reason']}")
            continue
        acc = f"acc {s['accuracy']:.3f}" if s.get("accuracy") is not None else ""
        print(f"{name:<28} {s['kind']:<7} N={s['num_virtual_tokens']:<4} H={s['hidden_size'] or '-':<5} "
              f"task={s['task'] or '-':<8} "
              f"base={s['base_model'] or 'unknown'} {acc}".rstrip())


# ---------------------------------------------------------------- serve


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``softprompt serve``: one flag per ``ServerConfig`` field, plus --model and --force."""
    s = sub.add_parser("serve", help="HTTP server: OpenAI-compatible API, classify, prompt registry, web page")
    add_model_flags(s)
    add_flags(s, ServerConfig, helps={"api_key": "require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                                                 "(default $SOFTPROMPT_API_KEY, else none)"})
    s.add_argument("--force", action="store_true", help="serve prompts trained on another base model (same H)")
    add_device_flags(s, auto_dtype=True)
    v = s.add_argument_group("engine (docs/serving.md)")
    v.add_argument("--engine", default="auto", choices=("auto", "vllm", "native"),
                   help="vllm: vLLM's engine in-process (bash scripts/bootstrap.sh --vllm); native: the built-in "
                        "engine; auto: vLLM where installed and the model and stored prompts allow (default %(default)s)")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="FLAGS",
                   help="vLLM's own engine flags, passed through (repeatable), e.g. "
                        "--vllm-arg='--tensor-parallel-size 2' --vllm-arg=--enforce-eager")
    r = s.add_argument_group("Ray Serve (pip install 'softprompt[ray]'; docs/scaling.md)")
    r.add_argument("--ray", action="store_true", help="serve the same app over Ray Serve replicas")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with the model loaded once (default %(default)s)")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto' after 'ray start --head', or ray://HOST:10001); default: start one here")
    s.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from softprompt.serve import app as server

    key = a.api_key if a.api_key is not None else a.env.api_key
    cfg = from_args(ServerConfig, a, api_key=key)
    if a.ray:
        from softprompt.serve import ray_serve

        if a.engine == "vllm":
            raise UserError("--engine vllm with --ray: Ray Serve replicas run the built-in engine; for vLLM across "
                            "machines pass vLLM's own flags (--vllm-arg, docs/scaling.md)")

        ray_serve.serve_forever(cfg, a.model, replicas=a.replicas, address=a.ray_address, force=a.force,
                                device=a.device, dtype=a.dtype, store=a.store, env=a.env.forwarded)
        return 0
    server.serve(cfg, a.model, force=a.force, device=a.device, dtype=a.dtype, store=a.store, engine=a.engine,
                 vllm_args=a.vllm_arg, vllm_cpus=(a.env.vllm_cpu_bind, environ.bind_vllm_cpus))
    return 0
