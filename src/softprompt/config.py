"""Small frozen configuration dataclasses, one per concern: every config of the project lives here.

Every field declares its default and one-line help here and nowhere else with ``option(...)``
(also ``choices`` and ``none``, the word typed for ``None``: ``all``, ``never``). ``__post_init__``
validates; its messages name the field's CLI flag (``flag``). Every config round-trips through
JSON (``configio.py``). The CLI builds its flags from these fields (``cli/flags.py``), so a default
changed here changes everywhere and the CLI defines none of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softprompt.configio import JsonMixin as _JsonMixin
from softprompt.configio import flag, option
from softprompt.datafiles import DataFiles


class UserError(ValueError):
    """A mistake in the user's input: shown as one line, exit code 2, never a traceback."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _positive(cfg: Any, names: tuple[str, ...], minimum: float = 1) -> None:
    """One line naming the flag of the first field of ``names`` below ``minimum`` (None passes)."""
    for name in names:
        value = getattr(cfg, name)
        _check(value is None or value >= minimum,
               f"{flag(name)} must be {'positive' if minimum > 0 else 'at least 0'}, got {value}")


@dataclass(frozen=True)
class DataConfig(_JsonMixin):
    path: str | None = option(None, 'training data: csv, tsv, jsonl, "<label> <text>" lines, or a datasets data set (folder or hub name)', metavar="PATH")
    eval_path: str | None = option(None, 'held-out data, read as --data is; not given: a dev split carved from train', metavar="PATH")
    text_column: str | None = option(None, 'language-modelling mode: the one text column', metavar="COLUMN")
    template: str | None = option(None, 'input -> target mode: e.g. "Review: {text}\\nSentiment:"', metavar="TEMPLATE")
    target_column: str | None = option(None, 'input -> target mode: the column holding the target', metavar="COLUMN")
    verbalizer: dict[str, str] | None = option(None, 'label value -> label word ("0" -> "negative")')
    limit: int | None = option(None, 'keep only the first K training rows', none="all")
    eval_limit: int | None = option(None, 'keep only the first K held-out rows', none="all")
    max_length: int = option(256, 'tokens per row (input + target); longer rows are truncated')
    dev_fraction: float = option(0.1, 'share of train carved out as dev when no eval file is given')
    columns: tuple[str, ...] | None = option(None, 'names for headerless csv/tsv files')
    derive: dict[str, str] | None = option(None, 'extra columns built from templates of others')
    label_map: dict[str, str] | None = option(None, 'rewrite target values before the verbalizer')
    data_split: str | None = option(None, 'a datasets data set as --data: the split to read (train when not given)', metavar="SPLIT")
    eval_split: str | None = option(None, 'a datasets data set as held-out data: its split (validation when not given, else test)', metavar="SPLIT")
    data_config: str | None = option(None, 'a datasets data set on the hub: its configuration name', metavar="NAME")
    chat: bool = option(False, "chat form: the filled template is the user turn, the target the assistant reply (the model's chat template)")
    system: str | None = option(None, 'chat form: a system message before every row', metavar="TEXT")
    hand_templates: tuple[str, ...] = option((), "a recipe's hand-written template candidates (compare)")
    files: DataFiles | None = option(None, "the files of train, dev and test, resolved where the command builds its "
                                     "config (recipes.resolve); None: the fields above name them")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        files = data.get("files")
        return super().from_dict({**data, "files": DataFiles.from_dict(files) if isinstance(files, dict) else None})

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}")
        _check(self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}")
        _check(self.eval_limit is None or self.eval_limit > 0, f"--eval-limit must be positive, got {self.eval_limit}")
        _check(0 <= self.dev_fraction < 1, f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
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
INITS = ("random", "text", "vocab", "labels", "transfer")  # prompt initialisations (besides prompt:NAME)


@dataclass(frozen=True)
class PromptConfig(_JsonMixin):
    num_virtual_tokens: int = option(20, 'N: virtual tokens in the soft prompt')
    init: str = option("random", "the prompt's starting point; prompt:NAME starts from a stored prompt (random: best measured, docs/tuning.md)",
                       choices=INITS + ("prompt:NAME",))
    init_text: str | None = option(None, 'text for --init text', metavar="TEXT")
    kind: str = option("shallow", 'shallow: (N, H) input embeddings; deep: keys/values at every layer (prefix tuning); auto: kind, '
                       'init, lr, N and budget chosen from the data (docs/tuning.md)', choices=(*REPARAMS, "auto"))
    reparam: str | None = option(None, 'training-time reparameterisation, folded before saving: residual, mlp, lstm (shallow); mlp (deep)',
                                 choices=("residual", "mlp", "lstm"))
    dropout: float = option(0.0, 'prefix dropout while training (P-tuning v2 uses 0.1); never at evaluation or serving')
    freeze_first: bool = option(False, "keep the first virtual token as initialised (an attention sink, as PEFT's Cartridges)")
    offset_rank: int = option(0, 'DePT: rank r of a low-rank offset A (offset_length x r) @ B (r x H) added to the input tokens; 0 = none')
    offset_length: int = option(256, 'DePT: input positions the offset covers (T_max); later tokens get none')
    memory: bool = option(False, 'PrefixMemory (deep prompts): a trainable per-head term phi(q)^T M outside the softmax, M zero-initialised')

    def __post_init__(self) -> None:
        _check(self.kind in (*REPARAMS, "auto"), f"--kind must be one of {', '.join(REPARAMS)}, auto, got {self.kind!r}")
        _check(self.reparam is None or self.kind == "auto" or self.reparam in REPARAMS[self.kind],
               f"--reparam {self.reparam} is not supported for --kind {self.kind} "
               f"(choose {', '.join(REPARAMS.get(self.kind, ()))})")
        _check(
            self.num_virtual_tokens > 0,
            f"--num-virtual-tokens must be positive, got {self.num_virtual_tokens}",
        )
        _check(
            self.init in INITS or self.init.startswith("prompt:"),
            f"--init must be one of {', '.join(INITS)} or prompt:NAME, got {self.init!r}",
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
    lr: float = option(0.03, 'AdamW learning rate for the prompt (best measured, docs/tuning.md)')
    epochs: int = option(3, 'passes over the training data (ignored when --steps is given)')
    steps: int | None = option(None, 'optimiser steps in total; overrides --epochs')
    batch_size: int = option(8, 'rows per micro-batch')
    grad_accum: int = option(1, 'micro-batches per optimiser step')
    warmup_ratio: float = option(0.06, 'share of steps with linear warm-up')
    warmup_steps: int | None = option(None, 'steps of linear warm-up; overrides --warmup-ratio')
    schedule: str = option("linear", 'lr after warm-up: linear (decay to 0) or cosine (half a cosine to 0)', choices=SCHEDULES)
    group_lr: dict[str, float] | None = option(None, 'lr per parameter group, e.g. offset=1e-3 (DePT: groups prompt, offset; PrefixMemory: prompt, memory); others use --lr, the memory 1e-4')
    weight_decay: float = option(0.0, 'AdamW weight decay on the prompt')
    max_grad_norm: float = option(1.0, 'gradient clipping; 0 disables')
    seed: int = option(0, 'seeds data order, init and sampling')
    patience: int | None = option(2, 'epochs without dev improvement before stopping early', none="never")
    eval_max_batch_rows: int = option(16, 'rows per forward when scoring the dev set between epochs (smaller than '
                                          "eval's: it runs beside the training state)")
    fast_forward: bool = option(True, 'shared-prefix forward (exact); False = the naive concat path')
    precision: str = option("auto", 'compute precision: auto = bf16 autocast where the CPU or GPU computes bf16 natively, else fp32; the prompt and optimiser state stay fp32',
                            choices=PRECISIONS)
    pack: bool = option(False, 'pack short rows into shared sequences, attention kept inside each row (exact; decoder-only; no gain measured on length-bucketed batches, docs/benchmarks.md)')

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _check(self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}")
        _check(self.patience is None or self.patience > 0, f"--patience must be positive or never, got {self.patience}")
        _positive(self, ("eval_max_batch_rows",))
        _check(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _check(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        _check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(all(v > 0 for v in (self.group_lr or {}).values()), "--group-lr: every lr must be positive")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class GenerateConfig(_JsonMixin):
    max_new_tokens: int = option(64, 'tokens to generate at most')
    temperature: float = option(0.0, 'sampling temperature; 0 = greedy')
    top_p: float = option(1.0, 'nucleus sampling mass')
    repetition_penalty: float = option(1.0, '>1 discourages repeats (CTRL-style, as in transformers)')
    seed: int = option(0, 'seeds sampling')

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "--max-new-tokens must be positive")
        _check(self.temperature >= 0, "--temperature must be >= 0")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.repetition_penalty > 0, "--repetition-penalty must be positive")


# ---------------------------------------------------------------- inference and serving


@dataclass(frozen=True)
class EngineConfig(_JsonMixin):
    max_resident_prompts: int = option(64, 'prompts kept in memory (LRU); the rest reload from the store')
    prefix_cache_mb: float = option(256.0, 'bound on the per-prompt key/value prefix cache (LRU), MiB')
    max_batch_rows: int = option(64, 'rows per forward pass; longer request lists run in chunks (the library default; '
                                     'eval and serve set their own)')
    use_prefix_cache: bool = option(True, 'False = reference path: [pad][P][x] through the whole model')
    force: bool = option(False, 'accept prompts trained on another base model (equal H still required)')
    max_forward_tokens: int = option(1024, 'token slots per prefill or scoring forward (bounds activation memory)')
    score_group_mb: float = option(256.0, 'scoring: key/value copies + forward of one group of (input, label) pairs, MiB')

    def __post_init__(self) -> None:
        _positive(self, ("max_resident_prompts", "max_batch_rows", "max_forward_tokens"))
        _positive(self, ("prefix_cache_mb",), minimum=0)
        _check(self.score_group_mb > 0, f"--score-group-mb must be positive, got {self.score_group_mb}")


@dataclass(frozen=True)
class EvalConfig(_JsonMixin):
    prompts: tuple[str, ...] = option((), 'stored prompt names; none = the plain model; several = an ensemble')
    task: str | None = option(None, 'a task recipe (tasks/*.json); its split is evaluated')
    split: str = option("test", "which split of the recipe: eval (its dev split) or test", choices=("eval", "test"))
    limit: int | None = option(None, 'evaluate only the first K examples', none="all")
    length_normalize: bool = option(False, "divide each label's log-likelihood by its token count")
    max_batch_rows: int = option(32, 'rows per forward pass')
    max_new_tokens: int = option(32, 'exact match: generation budget per example (capped at target + 4)')

    def __post_init__(self) -> None:
        if self.split not in ("eval", "test"):
            raise UserError(f"--split must be eval or test, got {self.split!r}")
        _positive(self, ("limit", "max_batch_rows", "max_new_tokens"))


@dataclass(frozen=True)
class ServerConfig(_JsonMixin):
    host: str = option("127.0.0.1", 'bind address (loopback unless you mean to expose it)')
    port: int = option(8000, 'TCP port')
    api_key: str | None = option(None, 'require "Authorization: Bearer KEY" on /v1/* and /metrics', metavar="KEY")
    model_id: str | None = option(None, "id of the plain model in /v1/models (not given: the model's name)", metavar="ID")
    max_batch_rows: int = option(32, 'rows per forward pass, across requests and prompts; 1 = no batching')
    max_wait_ms: float = option(5.0, 'an idle worker waits this long for more requests to batch together')
    join_every: int = option(4, 'while rows decode, waiting requests join every this many steps (1 = each step)')
    max_queue: int = option(256, 'requests waiting for the worker; beyond it: 429 + Retry-After')
    max_body_bytes: int = option(1 << 20, 'JSON request bodies')
    max_upload_bytes: int = option(64 << 20, 'prompt uploads (PUT /v1/prompts/NAME), unpacked size too')
    max_prompt_tokens: int = option(2048, 'input tokens per row')
    max_tokens: int = option(512, 'largest max_tokens a request may ask for')
    max_rows: int = option(64, 'rows per request: prompts x n, or classify inputs')
    max_labels: int = option(32, 'labels per classify request')
    max_label_tokens: int = option(32, 'tokens per classify label word')
    max_template_chars: int = option(32768, 'a classify input rendered through its template, in characters')
    max_request_tokens: int = option(65536, "one request's tokens: per row, N + input + max_tokens (or label tokens)")
    max_request_mb: float = option(1024.0, "one request's estimated working memory (cache + activations), MiB; over it: 413")
    prefill_chunk: int = option(128, 'prompt tokens a row reads per forward, and the most slots a prefill piece or scoring slice takes beside decoding rows (a scoring slice even alone)')
    error_rate: float = option(20.0, "4xx answers per second one client address gets at once (a burst of twice that); beyond it each waits its turn at that rate; 0 = never wait")
    request_timeout_s: float = option(300.0, 'a request still running after this gets 504 and is cancelled')
    shutdown_timeout_s: float = option(30.0, 'graceful shutdown: time in-flight requests get to finish')

    def __post_init__(self) -> None:
        ints = ("port", "max_batch_rows", "join_every", "max_queue", "max_body_bytes", "max_upload_bytes",
                "max_prompt_tokens", "max_tokens", "max_rows", "max_labels", "max_label_tokens",
                "max_template_chars", "max_request_tokens", "prefill_chunk")
        _positive(self, ("port",), minimum=0)
        _positive(self, ints[1:])
        _positive(self, ("max_wait_ms", "shutdown_timeout_s"), minimum=0)
        _check(self.request_timeout_s > 0, f"--request-timeout-s must be positive, got {self.request_timeout_s}")
        _check(self.max_request_mb > 0, f"--max-request-mb must be positive, got {self.max_request_mb}")
        _check(self.error_rate >= 0, f"--error-rate must be >= 0, got {self.error_rate}")
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
    methods: tuple[str, ...] = option(COMPARE_DEFAULT, 'which methods, in this order', choices=COMPARE_METHODS)
    train_sizes: tuple[int | None, ...] = option((None,), 'training examples per run; all = the whole pool', none="all")
    seeds: tuple[int, ...] = option((0,), 'run seeds: training set, batch order, init, demos')
    lr_sweep: dict[str, tuple[float, ...]] = option(COMPARE_LR_SWEEP, "learning rates tried per trained method")
    budget: int | None = option(None, 'optimiser steps per training run (not given: --epochs, at least --min-steps)')
    curve: tuple[int, ...] = option((), 'learning curve: dev and test accuracy at these steps of ONE run per method and seed (at most --epochs epochs; the lr is raced on dev at the first point)')
    min_steps: int = option(50, 'small training sets still get this many steps (more epochs)')
    dev_sample: int | None = option(200, 'dev rows, a seeded sample: early stopping, lr, template', none="all")
    test_sample: int | None = option(None, 'test rows, a seeded sample', none="all")
    dev_fraction: float = option(0.1, 'share of train carved out as dev when there is no dev file')
    data_seed: int = option(0, 'seeds dev/test carving and sampling (fixed across run seeds)')
    few_shot_tokens: int = option(1024, 'context for demonstrations + query (capped by the model)')
    few_shot_max_k: int = option(32, 'at most this many demonstrations')
    latency_requests: int = option(20, 'single requests timed for the latency figure')
    serve_tasks: int = option(10, 'K in "bytes to serve K tasks"')

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
        _positive(self, ("budget", "min_steps", "dev_sample", "test_sample", "few_shot_tokens", "few_shot_max_k",
                         "latency_requests", "serve_tasks"))


@dataclass(frozen=True)
class MultitaskConfig(_JsonMixin):
    tasks: tuple[str, ...] = option((), 'task recipes (names under tasks/ or .json files), >= 2')
    per_task: int | None = option(256, 'training examples per task (seeded sample)', none="all")
    eval_per_task: int = option(64, 'dev rows per task; the mean dev accuracy picks the kept epoch')

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise UserError(f"--tasks needs at least two tasks, got {len(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise UserError("--tasks lists a task twice")
        _positive(self, ("per_task", "eval_per_task"))


CONTINUAL_METHODS = ("prompt", "progressive", "full")


@dataclass(frozen=True)
class ContinualConfig(_JsonMixin):
    tasks: tuple[str, ...] = option((), 'the task sequence (recipes), >= 2')
    methods: tuple[str, ...] = option(("prompt", "full"), 'which methods, in this order', choices=CONTINUAL_METHODS)
    per_task: int | None = option(256, 'training rows per task (seeded sample)', none="all")
    test_per_task: int | None = option(200, 'test rows per task (seeded sample)', none="all")
    stage_steps: int = option(32, 'optimiser steps per stage, every method')
    lr_full: float = option(3e-5, "full fine-tuning's learning rate (prompts use --lr)")

    def __post_init__(self) -> None:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise UserError("--tasks needs at least two different tasks")
        bad = [m for m in self.methods if m not in CONTINUAL_METHODS]
        if bad or not self.methods:
            raise UserError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(CONTINUAL_METHODS)}")
        _positive(self, ("stage_steps", "per_task", "test_per_task"))


@dataclass(frozen=True)
class InspectConfig(_JsonMixin):
    top_k: int = option(5, 'nearest vocabulary tokens per virtual token')
    eval_limit: int | None = option(64, 'keep only the first K dev rows for token importance', none="all")
    importance: bool = option(True, "the ablation of each virtual token (needs the prompt's task data)")

    def __post_init__(self) -> None:
        _positive(self, ("top_k", "eval_limit"))


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

