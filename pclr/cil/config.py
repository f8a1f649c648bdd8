"""Settings of a continual-instruction-tuning run: the task list and the trainer configuration."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args

from pclr.config import LRPConfig
from pclr.options import check_choice

Method = Literal["lora", "lora_lwf", "pclr", "pclr_lwf"]
"""'pclr' (CIL), 'pclr_lwf' (LwF inside task groups, CIL between), 'lora' / 'lora_lwf' (the LoRA baselines)."""
EvalMode = Literal["generate", "forced", "forced_generate"]
QKLoss = Literal["cos", "paper"]
KeyInit = Literal["random", "task_query"]
InferenceRouting = Literal["topr", "prototype"]

METHODS: tuple[str, ...] = get_args(Method)
EVAL_MODES: tuple[str, ...] = get_args(EvalMode)
QK_LOSSES: tuple[str, ...] = get_args(QKLoss)
KEY_INITS: tuple[str, ...] = get_args(KeyInit)
INFERENCE_ROUTINGS: tuple[str, ...] = get_args(InferenceRouting)


@dataclass
class Task:
    """One task of the sequence.

    name: label used in reports. train / test: path to a CoIN-format JSON file or the already-loaded list of samples
    ({"id", "image"?, "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}).
    image_root: directory that ``image`` paths are relative to. scorer: "exact" | "choice" | "grounding" or a
    callable ``(prediction: str, answer: str) -> float`` in [0, 1].
    """

    name: str
    train: Union[str, list]
    test: Union[str, list]
    image_root: Optional[str] = None
    scorer: Union[str, Callable[[str, str], float]] = "exact"


@dataclass
class TaskPlan:
    """What happens to the pool before/while learning one task (one entry of a progressive schedule).

    n_new: experts added for the task. keep: fraction alpha_t of the existing experts kept by compression before the
    task (1.0 = no compression). add_shared: create the shared ranks at this task (the reference does so at the first
    compression).
    """

    n_new: int
    keep: float = 1.0
    add_shared: bool = False

    def __post_init__(self) -> None:
        if self.n_new < 0:
            raise ValueError(f"TaskPlan.n_new must be >= 0, got {self.n_new}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"TaskPlan.keep must lie in (0, 1], got {self.keep}")


@dataclass
class CILConfig:
    """Trainer settings; defaults follow the PCLR reference for CoIN where one exists."""

    method: Method = field(default="pclr", metadata={"help": "'lora' | 'lora_lwf' | 'pclr' | 'pclr_lwf'."})
    lrp: LRPConfig = field(default_factory=LRPConfig, metadata={"help": "Pool/gate settings (r, alpha, budget, ...)."})
    schedule: Union[str, Sequence[TaskPlan], None] = field(
        default="auto", metadata={"help": "'coin8' (the paper's 8-task schedule), 'auto' (derived from budget and "
                                          "task count) or a list of TaskPlan / dicts, one per task (per group for "
                                          "pclr_lwf)."})
    compression: Optional[str] = field(
        default="index", metadata={"help": "'index' (drop every k-th, reference), 'importance' (|a_j||b_j|), "
                                           "'redundancy'; None = never compress (growing-pool ablation)."})
    integration: bool = field(default=True, metadata={"help": "Run QKLD after each compression (ablation: False)."})
    integration_steps: Optional[int] = field(
        default=None, metadata={"help": "QKLD steps after a compression; None = one pass over the task's train data."})
    integration_lr: Optional[float] = field(default=None, metadata={"help": "QKLD learning rate; None = lr."})
    kl_topk: int = field(default=100, metadata={"help": "Teacher top-k vocabulary entries in the QKLD loss."})
    kl_floor: float = field(default=1e-4, metadata={"help": "Floor of the running per-task KL used for sampling."})
    nearest_init_from_task: Optional[int] = field(
        default=None, metadata={"help": "From this task index on (0-based; reference: 4), new experts copy the most "
                                        "similar old experts (nearest-similarity init)."})
    key_init: KeyInit = field(
        default="random", metadata={"help": "Keys of a task's new experts: 'random' (normalised Gaussian, reference) "
                                            "or 'task_query' (the task's normalised mean query; routing "
                                            "works from the first step, which matters when tasks get few steps)."})
    lambda_qk: float = field(default=0.2, metadata={"help": "Weight of the query-key loss L_qk while learning."})
    qk_loss: QKLoss = field(default="cos", metadata={"help": "'cos' (mean 1 - cos, reference) or 'paper' (top-r L1)."})
    inference_routing: InferenceRouting = field(
        default="topr", metadata={"help": "'topr': top-r over all experts; 'prototype': route by the nearest task "
                                          "prototype of each key pool."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over each task's training data while learning."})
    batch_size: int = field(default=8, metadata={"help": "Global training batch (split across processes)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Per-process evaluation batch."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate of the learning phase (AdamW, no decay)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warmup fraction, then cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lwf_lambda: float = field(default=1.0, metadata={"help": "Weight of the LwF distillation loss."})
    lwf_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of LwF."})
    lwf_group_size: int = field(default=2, metadata={"help": "pclr_lwf: tasks per group (LwF inside, CIL between)."})
    lora_rank: Optional[int] = field(default=None, metadata={"help": "Rank of the LoRA baselines (default lrp.r)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation length at evaluation."})
    eval_mode: EvalMode = field(
        default="generate", metadata={"help": "'generate': greedy generation, then the task's scorer. 'forced': one "
                                              "teacher-forced forward per batch; a sample counts as correct iff the "
                                              "argmax at every answer position (end token included) is the gold "
                                              "token, i.e. iff greedy decoding returns the gold answer verbatim (a "
                                              "lower bound of 'generate' for lenient scorers; for grounding it "
                                              "counts exact boxes only). 'forced_generate': as 'forced', but "
                                              "samples of grounding tasks that fail it are generated and scored "
                                              "by IoU (= 'generate' for those tasks)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap per task (debug / quick runs)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Cap per task at evaluation."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Truncate training sequences to this length."})
    seed: int = field(default=0, metadata={"help": "Base seed; every task/phase reseeds from it (resume-exact)."})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: 'no' | 'bf16' | 'fp16'."})
    log_every: int = field(default=10, metadata={"help": "Steps between JSONL log lines."})
    tensorboard: bool = field(default=True, metadata={"help": "Also log to TensorBoard when it is installed."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (main process only)."})
    eval_every_task: bool = field(default=True, metadata={"help": "Evaluate all seen tasks after each task."})
    on_step: Optional[Callable[..., None]] = field(
        default=None, metadata={"help": "Called as on_step(trainer, task_index, phase, step) after every step."})

    def __post_init__(self) -> None:
        check_choice("CILConfig.method", self.method, METHODS)
        if isinstance(self.lrp, dict):
            self.lrp = LRPConfig.from_dict(self.lrp)
        if self.compression not in (None, "none") and not isinstance(self.compression, str):
            raise ValueError(f"CILConfig.compression must be a rule name or None, got {self.compression!r}")
        if self.compression == "none":
            self.compression = None
        check_choice("CILConfig.qk_loss", self.qk_loss, QK_LOSSES)
        check_choice("CILConfig.key_init", self.key_init, KEY_INITS)
        check_choice("CILConfig.eval_mode", self.eval_mode, EVAL_MODES)
        check_choice("CILConfig.inference_routing", self.inference_routing, INFERENCE_ROUTINGS)
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "kl_topk", "lwf_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CILConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise ValueError(f"CILConfig.epochs must be > 0, got {self.epochs}")
        if not isinstance(self.schedule, (str, type(None))):
            self.schedule = [p if isinstance(p, TaskPlan) else TaskPlan(**p) for p in self.schedule]

    @property
    def uses_pool(self) -> bool:
        """PCLR methods grow/compress a pool; LoRA baselines keep one fixed pool of r always-on experts."""
        return self.method in ("pclr", "pclr_lwf")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("on_step", "lrp")}
        d["lrp"] = self.lrp.to_dict()
        if isinstance(self.schedule, (list, tuple)):
            d["schedule"] = [asdict(p) for p in self.schedule]
        return d
