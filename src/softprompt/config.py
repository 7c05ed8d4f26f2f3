"""Small frozen configuration dataclasses, one per concern: every config of the project lives here.

Every field has its default and its one-line help (the comment after it) here and nowhere else;
``__post_init__`` validates, and every config round-trips through JSON (``to_dict`` /
``from_dict``). The CLI builds its flags from these fields and comments (``cli/flags.py``), so a
default changed here changes everywhere and the CLI defines none of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class UserError(ValueError):
    """A mistake in the user's input: shown as one line, exit code 2, never a traceback."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


class _JsonMixin:
    """JSON round trip: ``to_dict`` gives plain lists and dicts; ``from_dict`` turns the lists of
    tuple-typed fields back into tuples (so a config read from a result file equals the one that
    wrote it) and ignores keys it does not know."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _tupled(v, kinds[k]) for k, v in data.items() if k in kinds})


def _tupled(value: Any, annotation: str) -> Any:
    if isinstance(value, list) and annotation.startswith("tuple"):
        return tuple(value)
    if isinstance(value, dict) and annotation.startswith("dict[str, tuple"):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


@dataclass(frozen=True)
class DataConfig(_JsonMixin):
    path: str | None = None  # training data: csv, tsv, jsonl, "<label> <text>" lines, or a datasets data set (folder or hub name)
    eval_path: str | None = None  # evaluation data (as --data); None carves a dev split from train
    text_column: str | None = None  # language-modelling mode: the one text column
    template: str | None = None  # input -> target mode: e.g. "Review: {text}\nSentiment:"
    target_column: str | None = None  # input -> target mode: the column holding the target
    verbalizer: dict[str, str] | None = None  # label value -> label word ("0" -> "negative")
    limit: int | None = None  # keep only the first K training rows
    eval_limit: int | None = None  # keep only the first K evaluation rows
    max_length: int = 256  # tokens per row (input + target); longer rows are truncated
    dev_fraction: float = 0.1  # share of train carved out as dev when no eval file is given
    columns: tuple[str, ...] | None = None  # names for headerless csv/tsv files
    derive: dict[str, str] | None = None  # extra columns built from templates of others
    label_map: dict[str, str] | None = None  # rewrite target values before the verbalizer
    data_split: str | None = None  # a datasets data set: the split to train on (default train)
    eval_split: str | None = None  # a datasets data set as --eval-data: its split (default validation, else test)
    data_config: str | None = None  # a datasets data set on the hub: its configuration name
    chat: bool = False  # chat form: the filled template is the user turn, the target the assistant reply (the model's chat template)
    system: str | None = None  # chat form: a system message before every row

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}")
        _check(self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}")
        _check(0 <= self.dev_fraction < 1, "dev_fraction must be in [0, 1)")
        if self.template is not None or self.target_column is not None:
            _check(
                self.template is not None and self.target_column is not None,
                "input -> target mode needs both --template and --target-column",
            )
            _check(self.text_column is None, "give either --text-column or --template, not both")
        _check(
            self.verbalizer is None or self.template is not None,
            "--verbalizer needs --template and --target-column",
        )
        _check(not self.chat or self.template is not None,
               "--chat needs input -> target rows: give --template and --target-column")
        _check(self.system is None or self.chat, "--system needs --chat")

    @property
    def mode(self) -> str:
        return "target" if self.template is not None else "lm"


REPARAMS = {"shallow": ("residual", "mlp", "lstm"), "deep": ("mlp",)}  # prompt kind -> its reparameterisations


@dataclass(frozen=True)
class PromptConfig(_JsonMixin):
    num_virtual_tokens: int = 20  # N: virtual tokens in the soft prompt
    init: str = "random"  # random | text | vocab | labels | transfer | prompt:<name> (best measured, docs/tuning.md)
    init_text: str | None = None  # text for init=text
    kind: str = "shallow"  # shallow: (N, H) input embeddings | deep: keys/values at every layer (prefix tuning) | auto: kind, init, lr, N and budget chosen from the data (docs/tuning.md)
    reparam: str | None = None  # training-time reparameterisation, folded before saving: residual, mlp, lstm (shallow); mlp (deep)
    dropout: float = 0.0  # prefix dropout while training (P-tuning v2 uses 0.1); never at evaluation or serving
    freeze_first: bool = False  # keep the first virtual token as initialised (an attention sink, as PEFT's Cartridges)
    offset_rank: int = 0  # DePT: rank r of a low-rank offset A (offset_length x r) @ B (r x H) added to the input tokens; 0 = none
    offset_length: int = 256  # DePT: input positions the offset covers (T_max); later tokens get none
    memory: bool = False  # PrefixMemory (deep prompts): a trainable per-head term phi(q)^T M outside the softmax, M zero-initialised

    def __post_init__(self) -> None:
        _check(self.kind in (*REPARAMS, "auto"), f"--kind must be one of {', '.join(REPARAMS)}, auto, got {self.kind!r}")
        _check(self.reparam is None or self.kind == "auto" or self.reparam in REPARAMS[self.kind],
               f"--reparam {self.reparam} is not supported for --kind {self.kind} "
               f"(choose {', '.join(REPARAMS.get(self.kind, ()))})")
        _check(
            self.num_virtual_tokens > 0,
            f"--num-virtual-tokens must be positive, got {self.num_virtual_tokens}",
        )
        kinds = ("random", "text", "vocab", "labels", "transfer")
        _check(
            self.init in kinds or self.init.startswith("prompt:"),
            f"--init must be one of {', '.join(kinds)} or prompt:NAME, got {self.init!r}",
        )
        _check(self.init != "text" or bool(self.init_text), "--init text needs --init-text")
        _check(0 <= self.dropout < 1, f"--prompt-dropout must be in [0, 1), got {self.dropout}")
        _check(self.offset_rank >= 0 and self.offset_length > 0,
               "--offset-rank must be >= 0 and --offset-length positive")
        _check(not self.offset_rank or self.kind in ("shallow", "auto"),
               "--offset-rank (DePT's input offset) goes with --kind shallow")
        _check(not self.memory or self.kind in ("deep", "auto"), "--prefix-memory goes with --kind deep")


TRAIN_KIND = "auto"  # softprompt train's --kind when none is given (training/auto.py); the library's default stays shallow


PRECISIONS = ("auto", "fp32", "bf16")  # compute precision of training (precision.py)
SCHEDULES = ("linear", "cosine")  # the lr after warm-up: linear decay to 0, or half a cosine to 0


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    lr: float = 0.03  # AdamW learning rate for the prompt (best measured, docs/tuning.md)
    epochs: int = 3  # passes over the training data (ignored when steps is set)
    steps: int | None = None  # optimiser steps in total; overrides epochs
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_ratio: float = 0.06  # share of steps with linear warm-up
    warmup_steps: int | None = None  # steps of linear warm-up; overrides warmup_ratio
    schedule: str = "linear"  # lr after warm-up: linear (decay to 0) | cosine (half a cosine to 0)
    group_lr: dict[str, float] | None = None  # lr per parameter group, e.g. offset=1e-3 (DePT: groups prompt, offset); others use --lr
    weight_decay: float = 0.0  # AdamW weight decay on the prompt
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 0  # seeds data order, init and sampling
    patience: int | None = 2  # epochs without eval improvement before stopping; None = never
    eval_batch_size: int = 16  # rows per evaluation batch
    fast_forward: bool = True  # shared-prefix forward (exact); False = the naive concat path
    precision: str = "auto"  # auto (bf16 autocast where the CPU or GPU computes bf16 natively, else fp32) | fp32 | bf16; the prompt and optimiser state stay fp32
    pack: bool = False  # pack short rows into shared sequences, attention kept inside each row (exact; decoder-only; no gain measured on length-bucketed batches, docs/benchmarks.md)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _check(self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}")
        _check(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _check(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(all(v > 0 for v in (self.group_lr or {}).values()), "--group-lr: every lr must be positive")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class GenerateConfig(_JsonMixin):
    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    repetition_penalty: float = 1.0  # >1 discourages repeats (CTRL-style, as in transformers)
    seed: int = 0  # seeds sampling

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "--max-new-tokens must be positive")
        _check(self.temperature >= 0, "--temperature must be >= 0")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.repetition_penalty > 0, "--repetition-penalty must be positive")


# ---------------------------------------------------------------- inference and serving


@dataclass(frozen=True)
class EngineConfig(_JsonMixin):
    max_resident_prompts: int = 64  # prompts kept in memory (LRU); the rest reload from the store
    prefix_cache_mb: float = 256.0  # bound on the per-prompt key/value prefix cache (LRU), MiB
    max_batch_rows: int = 64  # rows per forward; longer request lists run in chunks
    use_prefix_cache: bool = True  # False = reference path: [pad][P][x] through the whole model
    force: bool = False  # accept prompts trained on another base model (equal H still required)
    max_forward_tokens: int = 1024  # token slots per prefill or scoring forward (bounds activation memory)
    score_group_mb: float = 256.0  # scoring: key/value copies + forward of one group of (input, label) pairs, MiB

    def __post_init__(self) -> None:
        if (self.max_resident_prompts < 1 or self.max_batch_rows < 1 or self.prefix_cache_mb < 0
                or self.max_forward_tokens < 1 or self.score_group_mb <= 0):
            raise UserError("engine limits must be positive")


@dataclass(frozen=True)
class EvalConfig(_JsonMixin):
    prompts: tuple[str, ...] = ()  # stored prompt names; () = the plain model; several = ensemble
    task: str | None = None  # a task recipe (tasks/*.json); its split is evaluated
    split: str = "test"  # eval | test: which split of the recipe
    limit: int | None = None  # evaluate only the first K examples
    length_normalize: bool = False  # divide each label's log-likelihood by its token count
    batch_size: int = 32  # rows per forward
    max_new_tokens: int = 32  # exact match: generation budget per example (capped at target + 4)

    def __post_init__(self) -> None:
        if self.split not in ("eval", "test"):
            raise UserError(f"--split must be eval or test, got {self.split!r}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}")
        if self.batch_size <= 0 or self.max_new_tokens <= 0:
            raise UserError("--batch-size and --max-new-tokens must be positive")


@dataclass(frozen=True)
class ServerConfig(_JsonMixin):
    host: str = "127.0.0.1"  # bind address (loopback unless you mean to expose it)
    port: int = 8000  # TCP port
    api_key: str | None = None  # require "Authorization: Bearer KEY" on /v1/* and /metrics
    model_id: str | None = None  # id of the plain model in /v1/models (default: the model's name)
    max_batch_rows: int = 32  # rows per engine forward, across requests and prompts; 1 = no batching
    max_wait_ms: float = 5.0  # an idle worker waits this long for more requests to batch together
    join_every: int = 4  # while rows decode, waiting requests join every this many steps (1 = each step)
    max_queue: int = 256  # requests waiting for the worker; beyond it: 429 + Retry-After
    max_body_bytes: int = 1 << 20  # JSON request bodies
    max_upload_bytes: int = 64 << 20  # prompt uploads (PUT /v1/prompts/NAME), unpacked size too
    max_prompt_tokens: int = 2048  # input tokens per row
    max_tokens: int = 512  # largest max_tokens a request may ask for
    max_rows: int = 64  # rows per request: prompts x n, or classify inputs
    max_labels: int = 32  # labels per classify request
    max_label_tokens: int = 32  # tokens per classify label word
    max_template_chars: int = 32768  # a classify input rendered through its template, in characters
    max_request_tokens: int = 65536  # one request's tokens: per row, N + input + max_tokens (or label tokens)
    max_request_mb: float = 1024.0  # one request's estimated working memory (cache + activations), MiB; over it: 413
    prefill_chunk: int = 128  # while rows decode, prompt/scoring tokens run per step beside them (chunked prefill)
    request_timeout_s: float = 300.0  # a request still running after this gets 504 and is cancelled
    shutdown_timeout_s: float = 30.0  # graceful shutdown: time in-flight requests get to finish

    def __post_init__(self) -> None:
        ints = ("port", "max_batch_rows", "join_every", "max_queue", "max_body_bytes", "max_upload_bytes",
                "max_prompt_tokens", "max_tokens", "max_rows", "max_labels", "max_label_tokens",
                "max_template_chars", "max_request_tokens", "prefill_chunk")
        for name in ints:
            if getattr(self, name) < (0 if name == "port" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0 or self.shutdown_timeout_s < 0:
            raise UserError("--max-wait-ms, --request-timeout-s and --shutdown-timeout-s must be positive")
        if not self.max_request_mb > 0:
            raise UserError("--max-request-mb must be positive")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key must not be empty")


# ---------------------------------------------------------------- experiments

COMPARE_METHODS = ("zero-shot", "few-shot", "prompt-tuning", "deep-prompt", "prompt-residual", "lora", "full")
COMPARE_DEFAULT = ("zero-shot", "few-shot", "prompt-tuning", "lora", "full")  # what --methods runs when not given
COMPARE_TRAINED = ("prompt-tuning", "deep-prompt", "prompt-residual", "lora", "full")
# prompt methods: compare method -> (PromptConfig kind, reparam)
COMPARE_PROMPT_KINDS = {"prompt-tuning": ("shallow", None), "deep-prompt": ("deep", None),
                        "prompt-residual": ("shallow", "residual")}
# learning rates tried per trained method, the kept one best on dev (ties keep the first);
# prompt tuning starts at TrainConfig's default (measured, docs/tuning.md); LoRA and full
# fine-tuning bracket the usual values for small decoder models
COMPARE_LR_SWEEP = {
    "prompt-tuning": tuple(dict.fromkeys((TrainConfig.lr, 0.1, 0.3))),
    "deep-prompt": (0.03, 0.01),  # TREC, 200 steps, random init, 200 test rows: 0.003 -> 66%, 0.01 -> 91%, 0.03 -> 92%, 0.1 -> 42%
    "prompt-residual": tuple(dict.fromkeys((TrainConfig.lr, 0.1, 0.3))),
    "lora": (1e-3, 3e-4, 3e-3),
    "full": (3e-5, 1e-5, 1e-4),
}
# can one forward serve rows of different tasks (in this implementation)?
COMPARE_MIXED_BATCH = {
    "zero-shot": True,
    "few-shot": True,
    "prompt-tuning": True,
    "deep-prompt": True,
    "prompt-residual": True,
    "lora": False,
    "full": False,
}


@dataclass(frozen=True)
class CompareConfig(_JsonMixin):
    methods: tuple[str, ...] = COMPARE_DEFAULT  # which methods, in this order (also deep-prompt, prompt-residual)
    train_sizes: tuple[int | None, ...] = (None,)  # examples per run; None = the pool
    seeds: tuple[int, ...] = (0,)  # run seeds: training set, batch order, init, demos
    lr_sweep: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(COMPARE_LR_SWEEP))
    budget: int | None = None  # optimiser steps per training run; None = epochs, >= min_steps
    curve: tuple[int, ...] = ()  # learning curve: dev and test accuracy at these steps of ONE run per method and seed (at most --epochs epochs; the lr is raced on dev at the first point)
    min_steps: int = 50  # small training sets still get this many steps (more epochs)
    eval_limit: int | None = 200  # dev rows (seeded sample): early stopping, lr, template
    test_limit: int | None = None  # test rows (seeded sample); None = the whole test set
    dev_fraction: float = 0.1  # share of train carved out as dev when there is no dev file
    data_seed: int = 0  # seeds dev/test carving and sampling (fixed across run seeds)
    few_shot_tokens: int = 1024  # context for demonstrations + query (capped by the model)
    few_shot_max_k: int = 32  # at most this many demonstrations
    latency_requests: int = 20  # single requests timed for the latency figure
    serve_tasks: int = 10  # K in "bytes to serve K tasks"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in COMPARE_METHODS]
        if bad or not self.methods:
            raise UserError(
                f"--methods: unknown {', '.join(bad) or '(none given)'}; "
                f"choose from {', '.join(COMPARE_METHODS)}"
            )
        if not self.train_sizes or any(n is not None and n <= 0 for n in self.train_sizes):
            raise UserError("--train-sizes must be positive integers or 'all'")
        if not self.seeds:
            raise UserError("--seeds needs at least one seed")
        if any(k <= 0 for k in self.curve) or (self.curve and self.budget):
            raise UserError("--curve takes positive step counts (200,600,1500) and no --budget: its last point is the budget")
        for m in COMPARE_TRAINED:
            if m in self.methods and not self.lr_sweep.get(m):
                raise UserError(f"no learning rate to try for {m}")
        for name in ("budget", "eval_limit", "test_limit", "latency_requests", "serve_tasks"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


@dataclass(frozen=True)
class MultitaskConfig(_JsonMixin):
    tasks: tuple[str, ...] = ()  # task recipes (names under tasks/ or .json files), >= 2
    per_task: int | None = 256  # training examples per task (seeded sample); None = all of them
    eval_per_task: int = 64  # dev rows per task; the mean dev accuracy picks the kept epoch

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise UserError(f"--tasks needs at least two tasks, got {len(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise UserError("--tasks lists a task twice")
        if self.per_task is not None and self.per_task <= 0 or self.eval_per_task <= 0:
            raise UserError("--per-task and --eval-per-task must be positive")


CONTINUAL_METHODS = ("prompt", "progressive", "full")


@dataclass(frozen=True)
class ContinualConfig(_JsonMixin):
    tasks: tuple[str, ...] = ()  # the task sequence (recipes), >= 2
    methods: tuple[str, ...] = ("prompt", "full")  # from CONTINUAL_METHODS
    per_task: int | None = 256  # training rows per task (seeded sample); None = all
    test_per_task: int | None = 200  # test rows per task (seeded sample); None = all
    steps: int = 32  # optimiser steps per stage, every method
    lr_full: float = 3e-5  # full fine-tuning's lr (prompts use TrainConfig.lr)

    def __post_init__(self) -> None:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise UserError("--tasks needs at least two different tasks")
        bad = [m for m in self.methods if m not in CONTINUAL_METHODS]
        if bad or not self.methods:
            raise UserError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(CONTINUAL_METHODS)}")
        if self.steps <= 0 or (self.per_task is not None and self.per_task <= 0):
            raise UserError("--steps and --per-task must be positive")


@dataclass(frozen=True)
class InspectConfig(_JsonMixin):
    top_k: int = 5  # nearest vocabulary tokens per virtual token
    eval_limit: int = 64  # evaluation rows for token importance
    importance: bool = True  # the ablation of each virtual token (needs the prompt's task data)

    def __post_init__(self) -> None:
        _check(self.top_k > 0 and self.eval_limit > 0, "--top-k and --eval-limit must be positive")


@dataclass(frozen=True)
class Launch:
    """How this process was started: one rank of ``torchrun`` / ``accelerate launch`` (they set
    RANK, WORLD_SIZE, LOCAL_RANK; read at the edge, ``cli/environ.py``), or a plain process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # this rank's GPU on its machine (``--device cuda`` means cuda:local_rank)
    launched: bool = False  # True under a launcher: training joins its process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

