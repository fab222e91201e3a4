"""Component configs built from the one :class:`Settings` (the commands' side of the layers).

model/ never sees ``Settings``: its components take these explicit configs, built here for the
train, serve and bench commands.
"""

from __future__ import annotations

from tgastream.core.settings import Settings
from tgastream.model.config import ModelConfig, OnlineConfig
from tgastream.model.guard import GuardConfig
from tgastream.model.guardrails import GuardrailsConfig
from tgastream.model.shadow import ShadowConfig
from tgastream.state.ann_index import AnnConfig


def online_model_config(settings: Settings) -> ModelConfig:
    """The online model's shape (no dropout). The learner sizes the tables by its id maps, so
    ``n_items`` / ``n_categories`` here are placeholders."""
    return ModelConfig(n_items=1, n_categories=1, dim=settings.dim, layers=settings.layers, heads=settings.heads,
                       dropout=0.0, repeat_prior=settings.repeat_prior,
                       conversion_prior=settings.conversion_prior, conversion_base_rate=settings.conversion_base_rate)


def ann_config(settings: Settings) -> AnnConfig:
    """How an API replica's item index searches (state/ann_index.py)."""
    return AnnConfig(exact_below=settings.ann_exact_below, nprobe=settings.ann_nprobe, lists_factor=settings.ann_lists_factor,
                     update_chunk=settings.ann_update_chunk, seed=settings.seed)


def online_config(settings: Settings, **changes) -> OnlineConfig:
    """Online learning as configured (``changes`` override fields that are not settings)."""
    return OnlineConfig(**{"lr": settings.lr, "replay_share": settings.replay_share, "seed": settings.seed,
                           "device": settings.device, "threads": settings.threads,
                           "sample_len": settings.sample_len, "conversion_feedback": settings.conversion_feedback,
                           "pending_predictions": settings.pending_predictions,
                           "conversion_snapshot_steps": settings.conversion_snapshot_steps,
                           "idle_ttl_s": settings.idle_ttl_s, "evict_every": settings.evict_every, **changes})



def guardrails_config(settings: Settings) -> GuardrailsConfig:
    """Shadow evaluation and the health guard as configured (``guard*``, ``shadow_share``)."""
    return GuardrailsConfig(
        enabled=settings.guard,
        guard=GuardConfig(margin=settings.guard_margin, window=settings.guard_window,
                          min_retrievals=settings.guard_min_retrievals, min_positives=settings.guard_min_positives),
        shadow=ShadowConfig(share=settings.shadow_share, window=settings.guard_window, seed=settings.seed))
