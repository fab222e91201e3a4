"""Configuration dataclasses of the models and of their training loop (explicit, passed in)."""

from __future__ import annotations

from dataclasses import dataclass

from tgastream.core.settings import DIM, HEADS, LAYERS, LR, REPLAY_SHARE, SAMPLE_LEN
from tgastream.state.graph import N_BEHAVIORS, N_EDGE_TYPES, N_GAP_BUCKETS

SELF_EDGE_TYPE = N_EDGE_TYPES
"""Transition type of a node's edge to itself (the 4th slot of the neighbor index); 49 types in all."""

IMPLS = ("auto", "fused", "reference", "naive")


@dataclass(frozen=True)
class ModelConfig:
    """Width, depth and heads of a sequence recommender (TGA, SASRec or DIN).

    ``n_items`` / ``n_categories`` are embedding-table sizes (row 0 = padding/unknown), not
    vocabulary sizes: the rows come from a :class:`model.vocab.Vocab`, which may grow up to them.
    """

    n_items: int
    n_categories: int
    dim: int = DIM
    layers: int = LAYERS
    heads: int = HEADS
    ffn_mult: int = 1  # SASRec's original point-wise FFN is d -> d -> d; 4 is the BERT habit
    dropout: float = 0.2
    copy: bool = True  # retrieval may point back at the user's own nodes (TGA default)
    repeat_prior: bool = True  # the pointer starts as repeat-recent (a learned prior over the context's distinct
    # items by recency and touch count, model/retrieval_head.py); only with copy
    pointer_bound: float = 8.0  # with repeat_prior: the learned pointer term is bounded to ±this (scaled tanh), so
    # only the prior's level can switch the pointer off (model/retrieval_head.py); 0 = unbounded
    recency_buckets: int = 24  # pointer recency bias: nodes back from the newest, exact < 16, then log2
    max_positions: int = 8192  # SASRec's learned positions (distance from the newest node)
    n_behaviors: int = N_BEHAVIORS
    n_gap_buckets: int = N_GAP_BUCKETS
    n_edge_types: int = N_EDGE_TYPES + 1  # 48 transitions + self
    uniform_negatives: int = 256
    logq: bool = True  # correct sampled-softmax negatives by log(expected draws)
    temperature: float = 0.2  # > 0: catalogue scores are cos(u, e_i) / temperature; 0: plain u · e_i
    # the balance of the two heads, chosen on the validation share of taobao-users-60k (README "Model quality"):
    # the conversion loss weighs 30× in the head but sends none of its gradient into the shared encoder and
    # item tower, so the retrieval head keeps them (weight 30 with the full gradient had cost HR@10)
    conversion_weight: float = 30.0
    conversion_grad: float = 0.0  # share of the conversion loss's gradient that reaches the shared encoder and
    # item tower (1: all; 0: stop-grad, the conversion head learns on top of retrieval-shaped states)
    conversion_raw: bool = False  # the conversion head also target-attends over raw node embeddings of a table of
    # its own, trained by the conversion loss alone (DIN's input beside the encoder's; model/conversion_head.py);
    # offline only: the online learner's rows (model/rows.py) do not grow that table
    conversion_features: bool = False  # the conversion head's MLP also reads behavior-typed counts of the candidate
    # item/category in the context and how many nodes back the item was last seen (conversion_head.context_features)
    conversion_prior: bool = False  # the conversion logit starts as repeat-interest: + s · log(1 + touches of the
    # candidate in the context, carts and favs counting double), s learned from 1, the MLP's output layer from 0
    # (model/conversion_head.py); the online learner's default (Settings.conversion_prior)
    conversion_base_rate: float = 0.0  # > 0: the conversion logit's output bias starts at logit(rate), so the
    # untrained head predicts about the base rate (with the prior: exactly, for clicks on untouched items) instead of
    # 0.5 and up; 0 = bias from 0 (model/conversion_head.py)
    transition_prior: bool = False  # add w · log(1 + co-visitation score) to retrieval logits when the batch
    # carries a prior (model/retrieval_head.py); without one the term is 0
    impl: str = "auto"  # TGA aggregation: fused C kernel (CPU), reference torch ops, or naive

    def validate(self) -> "ModelConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if min(self.n_items, self.n_categories) < 1:
            raise ValueError("n_items and n_categories must be >= 1 (row 0 is padding/unknown)")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if not 0.0 <= self.conversion_base_rate < 1.0:
            raise ValueError(f"conversion_base_rate must be in [0, 1), got {self.conversion_base_rate}")
        if not 0.0 <= self.conversion_grad <= 1.0:
            raise ValueError(f"conversion_grad must be in [0, 1], got {self.conversion_grad}")
        if self.dim // self.heads > 256:
            raise ValueError("head width above 256 is not supported by the fused kernel")
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Offline training budget; the same for every model compared in one run."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without validation improvement before stopping
    seed: int = 0
    max_train_samples: int = 0  # 0 = all; else a seeded subsample per epoch budget
    conversion_finetune_epochs: int = 0  # > 0: after training, this many epochs of the conversion head alone on
    # the frozen encoder (model/training.py: finetune_conversion); early stopping then picks the retrieval
    # checkpoint by retrieval and the head by conversion logloss


@dataclass(frozen=True)
class OnlineConfig:
    """Online learning (model/online.py): step, replay, id rows, metrics, and where it runs.
    The model's shape is its :class:`ModelConfig`."""

    lr: float = LR
    replay_share: float = REPLAY_SHARE
    reservoir: int = 20_000
    idle_ttl_s: float = 7 * 86400.0  # evict id rows unused for this long (event time)
    evict_every: int = 200  # steps between eviction sweeps
    chunk: int = 4096  # id map / table growth step
    metric_window: int = 5000
    rank_budget: int = 2_000_000  # prequential ranking: (retrieval rows × catalogue items) per step at most
    train: bool = True  # False: a frozen model that only scores (the benchmark's baseline)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = cores - 1 (at least 1)
    sample_len: int = SAMPLE_LEN  # graph nodes of a published user context
    conversion_feedback: str = "wait"  # wait | fnw: how a click is trained before its label is known (model/feedback.py)
    pending_predictions: int = 200_000  # click-time predictions kept until their label (model/clicktime.py)
    conversion_snapshot_steps: int = 0  # > 0: clicks' P(buy) from a copy refreshed every N steps (model/online.py)
