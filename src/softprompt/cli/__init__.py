"""Command line: ``softprompt <command>``. Each command parses, builds configs, calls ONE
library function and prints. Defaults come from the config dataclasses (``config.py``).

User mistakes (``UserError``) print one line and exit 2; Ctrl-C exits 130 and leaves the last
checkpoint usable by ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from softprompt.config import (
    DataConfig,
    GenerateConfig,
    PromptConfig,
    TrainConfig,
    UserError,
    parse_verbalizer,
)


def _default(cls, name):
    return cls.__dataclass_fields__[name].default


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="smollm2-135m (default, embedded) or a local transformers folder")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K (under torchrun, cuda = this process's GPU) (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the frozen model's dtype; a trained prompt stays float32 (default %(default)s)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", help="a task recipe under tasks/ (sst2, trec, agnews) or a recipe .json file")
    g.add_argument("--data", help="training file: .csv, .tsv, .jsonl or '<label> <text>' lines")
    g.add_argument("--eval-data", help="evaluation file (default: a seeded 10%% dev split of --data)")
    g.add_argument("--data-root", help="where task recipes find their files (default $SOFTPROMPT_DATA or ../shared/data)")
    g.add_argument("--text-column", help="language modelling on this column")
    g.add_argument("--template", help='input template, e.g. "Review: {text}\\nSentiment:"')
    g.add_argument("--target-column", help="column with the target (input -> target mode)")
    g.add_argument("--verbalizer", help='label words, e.g. "0=negative,1=positive"')
    g.add_argument("--limit", type=int, help="use only the first K training rows")
    g.add_argument("--eval-limit", type=int, help="use only the first K evaluation rows")
    g.add_argument("--max-length", type=int, default=None, help=f"tokens per row (default {_default(DataConfig, 'max_length')})")


def data_config(a) -> DataConfig:
    if a.data_root:
        os.environ["SOFTPROMPT_DATA"] = a.data_root
    if not a.task and not a.data:
        raise UserError("give --data PATH (csv, tsv, jsonl) or --task NAME")
    kw = dict(path=a.data, eval_path=a.eval_data, text_column=a.text_column, template=_unescape(a.template),
              target_column=a.target_column, verbalizer=parse_verbalizer(a.verbalizer), limit=a.limit,
              eval_limit=a.eval_limit)
    if a.max_length is not None:
        kw["max_length"] = a.max_length
    if not a.task and not a.text_column and not a.template:
        raise UserError("say what to learn: --text-column C, or --template TPL --target-column C")
    if a.task:  # the recipe fills what the user did not give
        return DataConfig(**{k: v for k, v in kw.items() if v is not None})
    return DataConfig(**kw)


def _unescape(text: str | None) -> str | None:
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt and training")
    g.add_argument("--name", help="name of the prompt in the store (default: task or data file name)")
    g.add_argument("--num-virtual-tokens", type=int, default=_default(PromptConfig, "num_virtual_tokens"), help="N (default %(default)s)")
    g.add_argument("--init", default=_default(PromptConfig, "init"), help="random | text | vocab | labels | transfer (the best-suited stored prompt) | prompt:NAME (default %(default)s)")
    g.add_argument("--init-text", help="text for --init text")
    for name in ("lr", "epochs", "steps", "batch_size", "grad_accum", "seed", "patience", "warmup_ratio", "weight_decay"):
        f = TrainConfig.__dataclass_fields__[name]
        typ = float if name in ("lr", "warmup_ratio", "weight_decay") else int
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=f.default, help=f"(default {f.default})")
    g.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint of --name")
    g.add_argument("--force", action="store_true", help="accept a prompt:NAME init from another base model")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the frozen model's layers over the processes (FSDP)")


def cmd_train(a) -> int:
    from softprompt import models
    from softprompt.training import distributed
    from softprompt.training.tune import train

    if not distributed.is_main():  # one rank of torchrun / accelerate launch: rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
        a.quiet = True
    dcfg = data_config(a)
    pcfg = PromptConfig(num_virtual_tokens=a.num_virtual_tokens, init=a.init, init_text=a.init_text)
    tcfg = TrainConfig(lr=a.lr, epochs=a.epochs, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                       seed=a.seed, patience=a.patience, warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay)
    name = a.name or (a.task if a.task else os.path.splitext(os.path.basename(a.data))[0])
    lm = models.load(a.model, a.dtype, a.device)
    try:
        res = train(lm, dcfg, pcfg, tcfg, name=name, task=a.task, resume=a.resume, progress=not a.quiet,
                    force=a.force, fsdp=a.fsdp)
    finally:
        distributed.teardown()
    if distributed.is_main():
        print_summary(res)
    return 0 if res.stopped != "non-finite loss" else 1


def print_summary(res) -> None:
    print(f"\nprompt      {res.name}  ({res.prompt.shape[0]} x {res.prompt.shape[1]}, {res.prompt.numel():,} trainable parameters)")
    print(f"data        {res.n_train} training rows, {res.n_eval} evaluation rows")
    print(f"training    {len(res.history)} steps in {res.train_time_s:.1f}s, {res.stopped}")
    for e in res.epochs:
        extra = "".join(f"  {k[5:]} {v:.4f}" for k, v in e.items() if k.startswith("eval_") and k != "eval_score")
        print(f"  epoch {e['epoch']:>3}  train loss {e['train_loss']:.4f}{extra}")
    if res.best:
        print("kept        the best epoch on the evaluation set")
    if res.path:
        print(f"saved       {res.path}")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    for name in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        f = GenerateConfig.__dataclass_fields__[name]
        typ = int if name in ("max_new_tokens", "seed") else float
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=f.default, help=f"(default {f.default})")


def gen_config(a) -> GenerateConfig:
    return GenerateConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          repetition_penalty=a.repetition_penalty, seed=a.seed)


def cmd_generate(a) -> int:
    from softprompt import models, store
    from softprompt.inference import engine

    cfg = gen_config(a)
    lm = models.load(a.model, a.dtype, a.device)
    prompt = None
    if a.prompt:
        sp = store.load_prompt(a.prompt)
        store.check_compatible(sp, lm.fingerprint, force=a.force)
        prompt = sp.embeddings
    g = engine.generate(lm, prompt, a.text, cfg)
    print(g.text)
    return 0


def cmd_quickstart(a) -> int:
    from softprompt.cli.quickstart import run

    run(data_root=a.data_root, print_fn=print, recommended=not a.skip_recommended)
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from softprompt.evaluate import EvalConfig

    add_model_args(p)
    add_device_args(p)
    p.add_argument("--prompt", help="stored prompt name, or a,b,c for an ensemble (default: the plain model)")
    p.add_argument("--task", help="a task recipe under tasks/ (sst2, trec, agnews) or a recipe .json file")
    p.add_argument("--split", choices=("eval", "test"), default=_default(EvalConfig, "split"),
                   help="which split of the task recipe (default %(default)s)")
    p.add_argument("--data", help="evaluation file: .csv, .tsv, .jsonl or '<label> <text>' lines")
    p.add_argument("--data-root", help="where task recipes find their files (default $SOFTPROMPT_DATA or ../shared/data)")
    p.add_argument("--template", help="input template (default: the prompt's stored one, then the task's)")
    p.add_argument("--target-column", help="column with the target")
    p.add_argument("--text-column", help="language-modelling evaluation on this column (loss, perplexity)")
    p.add_argument("--verbalizer", help='label words, e.g. "0=negative,1=positive" (classification)')
    p.add_argument("--limit", type=int, help="evaluate only the first K examples")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--length-normalize", action="store_true", help="divide label log-likelihoods by their token count")
    p.add_argument("--batch-size", type=int, default=_default(EvalConfig, "batch_size"), help="rows per forward (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=_default(EvalConfig, "max_new_tokens"),
                   help="exact match: generation budget per example (default %(default)s)")
    p.add_argument("--force", action="store_true", help="use prompts trained on another base model (same hidden size)")


def cmd_eval(a) -> int:
    from softprompt import evaluate, models, store
    from softprompt.inference import engine

    if a.data_root:
        os.environ["SOFTPROMPT_DATA"] = a.data_root
    prompts = tuple(store.check_name(p.strip()) for p in a.prompt.split(",")) if a.prompt else ()
    ecfg = evaluate.EvalConfig(prompts=prompts, task=a.task, split=a.split, limit=a.limit,
                               length_normalize=a.length_normalize, batch_size=a.batch_size,
                               max_new_tokens=a.max_new_tokens)
    overrides = dict(path=a.data, template=_unescape(a.template), target_column=a.target_column,
                     text_column=a.text_column, verbalizer=parse_verbalizer(a.verbalizer), max_length=a.max_length)
    if not a.task and not a.data:
        raise UserError("give --data PATH or --task NAME to evaluate on")
    lm = models.load(a.model, a.dtype, a.device)
    eng = engine.Engine(lm, engine.EngineConfig(force=a.force, max_batch_rows=a.batch_size))
    res = evaluate.evaluate(eng, ecfg, overrides)
    print_eval(res)
    return 0


def print_eval(res: dict) -> None:
    print(f"evaluated   {', '.join(res['prompts'])} on {res['data']} ({res['n']} examples, {res['seconds']}s)")
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


def cmd_prompts(a) -> int:
    from softprompt import store

    if a.action == "list":
        names = store.list_prompts()
        if not names:
            print(f"no prompts in {store.prompts_dir()}")
        for name in names:
            s = store.prompt_summary(name)
            if s["status"] != "ok":
                print(f"{name:<28} BROKEN  {s['error']}")
                continue
            acc = f"acc {s['accuracy']:.3f}" if s.get("accuracy") is not None else ""
            print(f"{name:<28} N={s['num_virtual_tokens']:<4} H={s['hidden_size']:<5} task={s['task'] or '-':<8} "
                  f"base={s['base_model'] or 'unknown'} {acc}".rstrip())
    elif a.action == "show":
        store.check_name(a.name)
        if not store.prompt_path(a.name).is_dir():
            raise UserError(f"prompt {a.name!r} not found ({store.prompt_path(a.name)})")
        print(json.dumps(store.prompt_summary(a.name), indent=2, sort_keys=True))
    elif a.action == "rm":
        print(f"removed {store.remove_prompt(a.name)}")
    elif a.action == "export":
        print(f"exported {a.name} to {store.export_prompt(a.name, a.dir)}")
    elif a.action == "import":
        fp, model_name = None, None
        if a.model:
            from softprompt import models

            lm = models.load(a.model)
            fp, model_name = lm.fingerprint, lm.name
        sp = store.import_prompt(a.dir, name=a.name, fingerprint=fp, model_name=model_name)
        print(f"imported {sp.name} ({sp.num_virtual_tokens} x {sp.embeddings.shape[1]}) into {sp.path}")
    return 0


def add_prompts_parser(sub) -> None:
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


def add_compare_parser(sub) -> None:
    from softprompt.experiments.compare import METHODS, CompareConfig

    c = sub.add_parser("compare", help="compare hand-written prompts, prompt tuning, LoRA and full fine-tuning")
    add_model_args(c)
    g = c.add_argument_group("data (a classification task)")
    g.add_argument("--task", help="a task recipe under tasks/ (sst2, trec, agnews, rte, boolq, cb) or a recipe .json file")
    g.add_argument("--data", help="training file (.csv, .tsv, .jsonl or '<label> <text>' lines); dev is carved from it")
    g.add_argument("--eval-data", help="test file for --data (default: a seeded 20%% carved from --data)")
    g.add_argument("--data-root", help="where task recipes find their files (default $SOFTPROMPT_DATA or ../shared/data)")
    g.add_argument("--template", help='input template, e.g. "Review: {text}\\nSentiment:"')
    g.add_argument("--target-column", help="column with the label")
    g.add_argument("--verbalizer", help='label words, e.g. "0=negative,1=positive"')
    g.add_argument("--max-length", type=int, help="tokens per row")
    g.add_argument("--limit", type=int, help="read only the first K training rows")
    d = CompareConfig()
    r = c.add_argument_group("comparison")
    r.add_argument("--methods", default=",".join(METHODS), help="comma list from %(default)s")
    r.add_argument("--train-sizes", default="all", help="training examples per run, e.g. 32,128,512,all (default %(default)s)")
    r.add_argument("--seeds", default="0", help="run seeds, e.g. 0,1,2 (default %(default)s)")
    r.add_argument("--budget", type=int, help=f"optimiser steps per training run, all methods (default: epochs, at least {d.min_steps})")
    r.add_argument("--epochs", type=int, default=_default(TrainConfig, "epochs"), help="epochs per run without --budget (default %(default)s)")
    r.add_argument("--lr", action="append", metavar="METHOD=LR[/LR...]", help="learning rates to sweep for a method (repeatable); "
                   + "; ".join(f"{k} {'/'.join(f'{v:g}' for v in vs)}" for k, vs in d.lr_sweep.items()) + " by default")
    r.add_argument("--num-virtual-tokens", type=int, default=_default(PromptConfig, "num_virtual_tokens"), help="N (default %(default)s)")
    r.add_argument("--init", default=_default(PromptConfig, "init"), help="prompt init: random | vocab | labels (default %(default)s)")
    r.add_argument("--eval-limit", type=int, default=d.eval_limit, help="dev rows, seeded sample (default %(default)s)")
    r.add_argument("--test-limit", type=int, help="test rows, seeded sample (default: all)")
    r.add_argument("--few-shot-tokens", type=int, default=d.few_shot_tokens, help="few-shot context budget (default %(default)s)")
    r.add_argument("--latency-requests", type=int, default=d.latency_requests, help="requests timed (default %(default)s)")
    r.add_argument("--quick", action="store_true", help="smoke test: one lr per method, 3 steps, a few rows")
    o = c.add_argument_group("output")
    o.add_argument("--out", default="compare-results", help="folder for compare_<tag>.json/.md/.png (default %(default)s)")
    o.add_argument("--tag", help="result name (default: the task or data file name)")
    o.add_argument("--notes", help="a Markdown file with a hand-written reading of the numbers, put into the report")
    o.add_argument("--report", help="no runs: render result JSON files (comma list) into <out>/comparison.md and plots")
    o.add_argument("--quiet", action="store_true", help="no progress display")
    o.add_argument("--resume", action="store_true", help="continue an interrupted comparison: runs already "
                   "finished (recorded in <out>/compare_<tag>.runs.jsonl) are not run again")
    c.set_defaults(func=cmd_compare, text_column=None, compare_parser=c)


def _command_line(a) -> str:
    """The command as the user could retype it: the subcommand and every non-default option."""
    import shlex

    parts = ["softprompt", a.command]
    for act in a.compare_parser._actions:
        if not act.option_strings or act.dest == "help":
            continue
        v = getattr(a, act.dest, None)
        if v is None or v is False or v == act.default:
            continue
        for item in v if isinstance(v, list) else [v]:
            parts += [act.option_strings[-1]] + ([] if item is True else [str(item)])
    return shlex.join(parts)


def _int_list(text: str, what: str, allow_all: bool = False) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip()
        if allow_all and part == "all":
            out.append(None)
        elif part.lstrip("-").isdigit():
            out.append(int(part))
        else:
            raise UserError(f"{what}: {part!r} is not an integer{' or all' if allow_all else ''}")
    return tuple(out)


def compare_config(a):
    from softprompt.experiments.compare import CompareConfig, quick

    sweep = dict(CompareConfig().lr_sweep)
    for item in a.lr or []:
        method, sep, lrs = item.partition("=")
        try:
            sweep[method.strip()] = tuple(float(x) for x in lrs.split("/"))
        except ValueError:
            raise UserError(f"--lr {item!r}: expected METHOD=LR[/LR...], e.g. lora=1e-3/3e-4") from None
        if not sep or method.strip() not in sweep:
            raise UserError(f"--lr {item!r}: METHOD must be one of {', '.join(sweep)}")
    cfg = CompareConfig(methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
                        train_sizes=_int_list(a.train_sizes, "--train-sizes", allow_all=True),
                        seeds=_int_list(a.seeds, "--seeds"), lr_sweep=sweep, budget=a.budget,
                        eval_limit=a.eval_limit, test_limit=a.test_limit, few_shot_tokens=a.few_shot_tokens,
                        latency_requests=a.latency_requests)
    return quick(cfg) if a.quick else cfg


def cmd_compare(a) -> int:
    from pathlib import Path

    from softprompt import models
    from softprompt.experiments import compare, compare_report

    notes = None
    if a.notes:
        if not os.path.isfile(a.notes):
            raise UserError(f"--notes: no such file {a.notes}")
        notes = open(a.notes, encoding="utf-8").read()
    out, command = Path(a.out), _command_line(a)
    if a.report:
        docs = [compare_report.read_json(p.strip()) for p in a.report.split(",") if p.strip()]
        print(f"wrote {compare_report.write_report(docs, out, 'comparison', command, notes)}")
        return 0
    ccfg = compare_config(a)
    dcfg = data_config(a)
    if dcfg.verbalizer is None and not a.task:
        raise UserError("compare needs a classification task: give --verbalizer (and --template, --target-column)")
    tcfg = TrainConfig(epochs=a.epochs)
    pcfg = PromptConfig(num_virtual_tokens=a.num_virtual_tokens, init=a.init)

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    lm = models.load(a.model)
    tag = a.tag or compare_report.task_name(a.task, dcfg)
    journal = out / f"compare_{tag}.runs.jsonl"
    doc = compare.run(lm, dcfg, a.task, ccfg, tcfg, pcfg, progress=not a.quiet, say=say, journal=journal, resume=a.resume)
    doc["tag"], doc["command"] = tag, command
    path = compare_report.write_json(doc, out / f"compare_{tag}.json")
    journal.unlink()  # the result is written: the finished runs are in it
    md = compare_report.write_report([doc], out, f"compare_{tag}", command, notes)
    print("\n".join(compare_report.table(doc)))
    print(f"wrote {path} and {md}")
    return 0


def add_serve_parser(sub) -> None:
    """``softprompt serve``: one flag per ``server.ServerConfig`` field, plus --model and --force."""
    import dataclasses

    from softprompt.serve.app import ServerConfig

    s = sub.add_parser("serve", help="HTTP server: OpenAI-compatible API, classify, prompt registry, web page")
    add_model_args(s)
    helps = ServerConfig.field_help()
    for f in dataclasses.fields(ServerConfig):
        flag, text = "--" + f.name.replace("_", "-"), helps.get(f.name, "")
        if f.name == "api_key":
            s.add_argument(flag, default=os.environ.get("SOFTPROMPT_API_KEY"), help=text + " (default $SOFTPROMPT_API_KEY)")
            continue
        typ = str if f.name in ("host", "model_id") else type(f.default)
        s.add_argument(flag, type=typ, default=f.default, help=f"{text} (default {f.default})")
    s.add_argument("--force", action="store_true", help="serve prompts trained on another base model (same H)")
    add_device_args(s)
    r = s.add_argument_group("Ray Serve (pip install 'softprompt[ray]'; docs/scaling.md)")
    r.add_argument("--ray", action="store_true", help="serve the same app over Ray Serve replicas")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with the model loaded once (default %(default)s)")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto' after 'ray start --head', or ray://HOST:10001); default: start one here")
    s.set_defaults(func=cmd_serve)


def cmd_serve(a) -> int:
    import dataclasses

    from softprompt.serve import app as server

    cfg = server.ServerConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(server.ServerConfig)})
    if a.ray:
        from softprompt.serve import ray_serve

        ray_serve.serve_forever(cfg, a.model, replicas=a.replicas, address=a.ray_address, force=a.force,
                        device=a.device, dtype=a.dtype)
        return 0
    server.serve(cfg, a.model, force=a.force, device=a.device, dtype=a.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a soft prompt (several processes: torchrun -m softprompt train ...)")
    add_model_args(t)
    add_device_args(t)
    add_data_args(t)
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    g = sub.add_parser("generate", help="generate text with a stored prompt or the plain model")
    add_model_args(g)
    g.add_argument("--prompt", help="name of a stored prompt (default: the plain model)")
    g.add_argument("--force", action="store_true", help="use a prompt trained on another base model")
    add_device_args(g)
    add_generate_args(g)
    g.add_argument("text", help="the input text")
    g.set_defaults(func=cmd_generate)
    q = sub.add_parser("quickstart", help="the walk-through: base vs tuned generation on the default model")
    q.add_argument("--data-root", help="data sets folder (default $SOFTPROMPT_DATA or ../shared/data)")
    q.add_argument("--skip-recommended", action="store_true", help="skip the second run with recommended settings")
    q.set_defaults(func=cmd_quickstart)
    ev = sub.add_parser("eval", help="evaluate the plain model, a prompt or an ensemble (last line: JSON)")
    add_eval_args(ev)
    ev.set_defaults(func=cmd_eval)
    add_prompts_parser(sub)
    add_serve_parser(sub)
    add_compare_parser(sub)
    from softprompt.cli import experiments as cli_tasks  # train-multitask, continual, inspect

    cli_tasks.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return a.func(a)
    except UserError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsoftprompt: interrupted; the last epoch checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging tweaks must never break the CLI
        pass


if __name__ == "__main__":
    raise SystemExit(main())
